"""Reading and writing SAE folders: sae_guard's own, SAELens's and sparsify's. Safetensors only.

sae_guard writes `cfg.json` (the config dataclass) and `sae.safetensors` (the state dict). Folders
from SAELens (`cfg.json` + `sae_weights.safetensors`, W_enc stored d_in x d_sae) and sparsify
(`cfg.json` + `sae.safetensors` with `encoder.weight`) are converted on load into the equivalent
sae_guard architecture, so they give the same codes as the library that wrote them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .registry import get_architecture

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
SAE_FILES = (CONFIG_NAME, WEIGHTS_NAME)


class SAEFormatError(ValueError):
    """A path that is not a readable SAE folder, with the reason."""


def save(sae, path: str | os.PathLike) -> Path:
    """Write the SAE to folder `path` atomically: files appear complete or not at all."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SAEFormatError(f"{path} is an existing file; an SAE is saved as a folder. Choose another path (the "
                             "file is left as it was)")
    if path.is_dir() and any(p.name not in SAE_FILES for p in path.iterdir()):
        raise SAEFormatError(f"{path} is a folder holding other files than an SAE's ({', '.join(SAE_FILES)}); saving "
                             "would replace it whole. Choose an empty or new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "sae_guard", "architecture": sae.architecture})
        _sort_header(tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(sae.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
            tmp.rename(path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _sort_header(file: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, so the same SAE always gives the same bytes (the
    library writes metadata keys in hash order). Same content, so the same length: rewritten in place."""
    with open(file, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > size:
            raise SAEFormatError(f"{file}: its sorted header ({len(text)} bytes) outgrew the written one ({size})")
        handle.seek(8)
        handle.write(text.ljust(size))  # safetensors pads its header with spaces


def load(path: str | os.PathLike, device: str | torch.device | None = None):
    """Load any supported SAE folder, in eval mode (ready to encode, as a trained SAE leaves `train`); refuse
    pickles with a message that says what to do instead."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SAEFormatError(
            f"{path} looks like a pickle ({path.suffix}); sae_guard never unpickles files, because loading a "
            "pickle can run arbitrary code. Convert it to a folder with cfg.json + sae.safetensors."
        )
    if not path.exists():
        raise SAEFormatError(f"no SAE at {path}: the path does not exist")
    if path.is_file():
        raise SAEFormatError(f"{path} is a file; an SAE is a folder holding {CONFIG_NAME} and a .safetensors file")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" It holds pickles ({', '.join(pickles)}), which sae_guard refuses to load." if pickles else ""
        raise SAEFormatError(f"{path} has no {CONFIG_NAME}.{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{cfg_path} is not valid JSON: {err}") from None

    try:
        if (path / SAELENS_WEIGHTS).exists():
            sae = _from_saelens(cfg, _read(path / SAELENS_WEIGHTS))
        elif (path / WEIGHTS_NAME).exists():
            weights = _read(path / WEIGHTS_NAME)
            sae = _from_sparsify(cfg, weights) if "encoder.weight" in weights else _from_sae_guard(cfg, weights)
        else:
            raise SAEFormatError(f"it has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {SAELENS_WEIGHTS}")
    except SAEFormatError as err:
        raise SAEFormatError(f"{path}: {err}") from None
    sae.train(False)
    return sae.to(device) if device is not None else sae


def _read(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise SAEFormatError(f"{file} is not a readable safetensors file: {err}") from None


def _build(architecture: str, fields: dict[str, Any], weights: dict[str, Tensor]):
    cls = get_architecture(architecture)
    missing_fields = [name for name in ("d_in", "d_sae") if name not in fields]
    if missing_fields:
        raise SAEFormatError(f"cfg.json has no {' / '.join(repr(n) for n in missing_fields)}: the SAE's sizes are "
                             "unknown; write them into cfg.json")
    try:
        sae = cls(cls.config_class.from_dict({**fields, "architecture": architecture}))
    except (TypeError, ValueError) as err:
        raise SAEFormatError(f"cfg.json of a {architecture} SAE does not make a valid config: {err}") from None
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise SAEFormatError(f"{architecture} weights do not match: missing {missing}, unexpected {unexpected}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise SAEFormatError(
                f"{architecture} weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    broken = [name for name, tensor in weights.items() if tensor.is_floating_point()
              and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise SAEFormatError(f"{architecture} weights {broken} hold NaN or inf: every score would be NaN and every "
                             "input would pass a guard; the file is damaged or the training diverged")
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    return sae


def _from_sae_guard(cfg: dict[str, Any], weights: dict[str, Tensor]):
    if "architecture" not in cfg:
        raise SAEFormatError("cfg.json has no 'architecture' field")
    fields = {k: v for k, v in cfg.items() if k != "architecture"}
    if "threshold" in weights and "selection" not in fields and _has_field(cfg["architecture"], "selection"):
        fields["selection"] = "batch"  # written before `selection` existed: a learned threshold means the batch rule
    return _build(cfg["architecture"], fields, weights)


def _has_field(architecture: str, name: str) -> bool:
    try:
        return name in {f.name for f in dataclasses.fields(get_architecture(architecture).config_class)}
    except ValueError:
        return False  # an unknown architecture: `_build` says so


def _from_saelens(cfg: dict[str, Any], w: dict[str, Tensor]):
    """SAELens: W_enc is (d_in, d_sae); b_dec is subtracted from the input only if apply_b_dec_to_input."""
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations") not in (None, "none"):
        raise SAEFormatError(
            f"SAELens SAE uses normalize_activations={cfg['normalize_activations']!r}, which needs dataset statistics "
            "that are not in the folder; fold the normalisation into the weights first"
        )
    W_enc = w["W_enc"].T.contiguous()
    b_enc = w.get("b_enc", torch.zeros(W_enc.shape[0]))
    b_dec = w["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        # W_enc x + b_enc == W_enc (x - b_dec) + (b_enc + W_enc b_dec)
        b_enc = b_enc + W_enc.double().matmul(b_dec.double()).to(b_enc.dtype)
    fields: dict[str, Any] = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]), "metadata": _saelens_meta(cfg)}
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": w["W_dec"], "b_dec": b_dec}
    if arch == "standard":
        name = "relu"
    elif arch == "topk":
        name, fields["k"] = "topk", int(cfg["k"])
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens ranks n_i * pre_i (n_i = |W_dec[i]|) and decodes (z / n) @ W_dec: the same SAE as
            # encoder rows and bias times n_i and unit decoder rows.
            norms = weights["W_dec"].norm(dim=-1, keepdim=True)
            weights["W_enc"], weights["b_enc"] = W_enc * norms, b_enc * norms[:, 0]
            weights["W_dec"] = weights["W_dec"] / norms
    elif arch == "jumprelu":
        name = "jumprelu"
        weights["threshold"] = w["threshold"] if "threshold" in w else w["log_threshold"].exp()
    else:
        raise SAEFormatError(f"SAELens architecture {arch!r} has no sae_guard equivalent yet")
    return _build(name, fields, weights)


def _saelens_meta(cfg: dict[str, Any]) -> dict[str, Any]:
    meta = dict(cfg.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_layer", "dataset_path", "context_size"):
        if key in cfg and key not in meta:
            meta[key] = cfg[key]
    return {"source": "sae_lens", **{k: v for k, v in meta.items() if _jsonable(v)}}


def _from_sparsify(cfg: dict[str, Any], w: dict[str, Tensor]):
    """sparsify: encoder.weight is (d_sae, d_in); codes = top-k of ReLU(encoder(x - b_dec))."""
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"sparsify activation {cfg['activation']!r} is not supported (only topk)")
    if "W_skip" in w or cfg.get("transcode"):
        raise SAEFormatError("sparsify transcoders / skip connections are not SAEs; not supported")
    d_sae, d_in = w["encoder.weight"].shape
    fields = {"d_in": int(cfg.get("d_in", d_in)), "d_sae": int(d_sae), "k": int(cfg["k"]),
              "metadata": {"source": "sparsify"}}
    weights = {"W_enc": w["encoder.weight"], "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    return _build("topk", fields, weights)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
