"""Training checkpoints in safetensors + JSON (no pickles): SAE, optimizer moments, trainer state."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..sae.io import save as save_sae

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def write(directory: Path, sae, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
          state: dict[str, Any]) -> None:
    """Write a checkpoint into `directory/checkpoint`, replacing the previous one atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=directory))
    try:
        save_sae(sae, tmp / "sae")
        flat = {f"state.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        opt_meta = []
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            entry = {}
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.numel() > 1:
                    flat[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    entry[key] = value.item() if torch.is_tensor(value) else value
            opt_meta.append(entry)
        save_file(flat, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({**state, "optimizer_scalars": opt_meta}, indent=2))
        final = directory / "checkpoint"
        old = directory / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exists(directory: Path | None) -> bool:
    return directory is not None and (directory / "checkpoint" / STATE_JSON).exists()


def read(directory: Path, sae, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore SAE weights and optimizer moments in place; return the trainer's tensors and state."""
    from ..sae.io import load as load_sae

    root = directory / "checkpoint"
    saved = load_sae(root / "sae")
    if saved.architecture != sae.architecture or saved.cfg.d_in != sae.d_in or saved.cfg.d_sae != sae.d_sae:
        raise ValueError(
            f"checkpoint in {directory} holds a {saved.architecture} SAE {saved.cfg.d_in}->{saved.cfg.d_sae}, "
            f"not the {sae.architecture} SAE {sae.d_in}->{sae.d_sae} being trained; use another checkpoint_dir"
        )
    sae.load_state_dict(saved.state_dict())
    flat = load_file(str(root / STATE_TENSORS))
    state = json.loads((root / STATE_JSON).read_text())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, (p, scalars) in enumerate(zip(params, state.pop("optimizer_scalars"))):
        entry = {k: torch.tensor(v, dtype=torch.float32) if k == "step" else v for k, v in scalars.items()}
        prefix = f"optim.{i}."
        for key, value in flat.items():
            if key.startswith(prefix):
                entry[key[len(prefix):]] = value.to(p.device)
        if entry:
            optimizer.state[p] = entry
    tensors = {k[len("state."):]: v for k, v in flat.items() if k.startswith("state.")}
    return tensors, state
