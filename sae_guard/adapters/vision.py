"""Vision backbones (timm ViTs and CNNs, open_clip image towers): images in, verdicts per image.

    g = guard(vit, sae=sae, concepts=[Concept("dog", target=dog_images, retain=other_images)], scope="patches")
    vit(pixels)                  # same call, same outputs; flagged images edited at the hookpoint
    g.classify([img1, img2])     # one verdict per image (PIL images, (3, H, W) tensors or a (B, 3, H, W) batch)

Images reach the model through its own preprocessing: timm's `resolve_data_config` + `create_transform`,
open_clip's `image_transform` with the tower's `image_size`/`image_mean`/`image_std` (or `preprocess=` given
by the caller, e.g. the one `open_clip.create_model_and_transforms` returned). Tensors are taken as already
preprocessed; one that looks like raw pixels ([0, 1] or [0, 255]) where the model expects mean/std normalisation
warns, since its scores would be read off-distribution.

Conversions: PIL images in modes 1, L, LA, P, RGBA, CMYK, YCbCr, I;16 are converted to RGB (grayscale replicated
over the three channels, alpha dropped); a (1, H, W) tensor is replicated to three channels. Refused, with the
model untouched: other modes, 2- or 4-channel tensors, uint8 tensors, non-finite values, a tensor whose size is
not the one a fixed-size model (a ViT) reads, and a batch mixing sizes.

Token scope (`scope=`): which positions score and, for a flagged image, are edited first.
- "all": every position (the default; the only scope of a CNN, whose feature map's positions are its tokens);
- "cls": the class token only (position 0 of a ViT with a class token);
- "patches": the patch tokens only (class and register tokens, `num_prefix_tokens`, excluded).
As everywhere in the gate, latents edited on an image's scoring positions are also edited at its other positions
where they fire (a ViT's later layers read every token).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .base import Adapter, MaskFn, ModelCall, device_of

SCOPES = ("all", "cls", "patches")
# PIL modes with a faithful RGB conversion (others, e.g. "F" or "I", are data, not photographs)
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "RGBX", "La", "RGBa")


class UnnormalisedImageWarning(UserWarning):
    """A tensor that looks like raw pixels was given to a model that expects mean/std-normalised ones."""


def is_timm(model: Any) -> bool:
    return type(model).__module__.startswith("timm.")


def is_open_clip(model: Any) -> bool:
    return type(model).__module__.startswith("open_clip.") and hasattr(model, "visual")


class VisionAdapter(Adapter):
    """timm image models and open_clip CLIP models: images through the model's own preprocessing."""

    name = "vision"

    def __init__(self, model: Any, tokenizer: Any = None, scope: str = "all",
                 preprocess: Callable[[Any], Tensor] | None = None) -> None:
        super().__init__(model, tokenizer=tokenizer)
        self.open_clip = is_open_clip(model)
        self.backbone = model.visual if self.open_clip else model
        if scope not in SCOPES:
            raise ValueError(f"unknown token scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.is_vit = self._is_vit()
        if scope != "all" and not self.is_vit:
            raise ValueError(f"scope={scope!r} needs a ViT (class and patch tokens); {type(self.backbone).__name__} "
                             "is a CNN whose feature-map positions are all patches: use scope='all'")
        if scope == "cls" and not self._has_class_token():
            raise ValueError(f"{type(self.backbone).__name__} has no class token; use scope='patches' or 'all'")
        self.scope = scope
        self.input_size, self.mean, self.std = self._data_config()
        self.preprocess = preprocess or self._default_preprocess()

    # ------------------------------------------------------------------ what the model is
    @classmethod
    def matches(cls, model: Any) -> bool:
        return isinstance(model, nn.Module) and (is_timm(model) or is_open_clip(model))

    def _is_vit(self) -> bool:
        return hasattr(self.backbone, "num_prefix_tokens") or hasattr(self.backbone, "class_embedding")

    def _has_class_token(self) -> bool:
        if self.open_clip:
            return getattr(self.backbone, "class_embedding", None) is not None
        return getattr(self.backbone, "cls_token", None) is not None

    @property
    def n_prefix(self) -> int:
        """Class and register tokens in front of the patches."""
        if self.open_clip:
            return 1 if self._has_class_token() else 0
        return int(getattr(self.backbone, "num_prefix_tokens", 0))

    @property
    def fixed_size(self) -> bool:
        """Whether the model reads one image size only (ViTs' position tables; CNNs take any size)."""
        return self.is_vit and not getattr(self.backbone, "dynamic_img_size", False)

    def _data_config(self) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
        if self.open_clip:
            size = self.backbone.image_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: PLC0415

            mean = tuple(getattr(self.backbone, "image_mean", None) or OPENAI_DATASET_MEAN)
            std = tuple(getattr(self.backbone, "image_std", None) or OPENAI_DATASET_STD)
            return (3, *size), mean, std
        config = self._timm_config()
        return tuple(config["input_size"]), tuple(config["mean"]), tuple(config["std"])

    def _timm_config(self) -> dict[str, Any]:
        """timm's data config, at the image size the model was built for (its pretrained config may say another)."""
        from timm.data import resolve_data_config  # noqa: PLC0415

        built = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None)
        override = {"input_size": (3, *built)} if built is not None else {}
        return resolve_data_config(override, model=self.backbone)

    def _default_preprocess(self) -> Callable[[Any], Tensor]:
        if self.open_clip:
            from open_clip import image_transform  # noqa: PLC0415

            return image_transform(self.input_size[1:], is_train=False, mean=self.mean, std=self.std)
        from timm.data import create_transform  # noqa: PLC0415

        return create_transform(**self._timm_config())

    def default_hookpoint(self, model: nn.Module) -> str:
        """Two-thirds of the way through the blocks (timm: `blocks`; open_clip: `visual.transformer.resblocks`)."""
        if self.open_clip and hasattr(model.visual, "transformer"):
            n = len(model.visual.transformer.resblocks)
            return f"visual.transformer.resblocks.{(2 * n) // 3}"
        blocks = getattr(model, "blocks", None) or getattr(model, "stages", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            name = "blocks" if getattr(model, "blocks", None) is blocks else "stages"
            return f"{name}.{min(len(blocks) - 1, (2 * len(blocks)) // 3)}"
        return super().default_hookpoint(model)

    def describe(self) -> str:
        return f"vision, scope={self.scope}"

    # ------------------------------------------------------------------ images -> one call
    def prepare(self, model: nn.Module, inputs: Sequence[Any]) -> ModelCall:
        pixels = self.pixels(inputs)
        return ModelCall.one_row_each(pixels.shape[0], pixels.to(device_of(model), _dtype_of(model)))

    def probe_inputs(self) -> list[Any]:
        from PIL import Image  # noqa: PLC0415

        return [Image.new("RGB", self.input_size[:0:-1], (128, 128, 128))]

    def pixels(self, inputs: Any) -> Tensor:
        """A (B, 3, H, W) float batch from PIL images, (C, H, W) tensors or a (B, C, H, W) tensor."""
        if inputs is None or isinstance(inputs, (str, bytes)):
            raise TypeError(f"images must be PIL images or image tensors, got {type(inputs).__name__}")
        if isinstance(inputs, Tensor):
            if inputs.ndim == 3:
                inputs = inputs[None]
            if inputs.ndim != 4:
                raise ValueError(f"an image tensor must be (C, H, W) or (B, C, H, W), got shape {tuple(inputs.shape)}")
            if len(inputs):
                inputs = torch.stack([self._tensor(x, i) for i, x in enumerate(inputs)])
                self._warn_if_raw(inputs)
            return self._check_batch(inputs)
        if _is_pil(inputs):
            inputs = [inputs]
        if not hasattr(inputs, "__len__") or not len(inputs):
            raise ValueError("no images given: pass a non-empty list of PIL images or image tensors")
        images = []
        for number, image in enumerate(inputs):
            if _is_pil(image):
                images.append(self._from_pil(image, number))
            elif isinstance(image, Tensor):
                images.append(self._tensor(image, number))
                self._warn_if_raw(images[-1])
            else:
                raise TypeError(f"image {number} is a {type(image).__name__}; pass PIL images or (C, H, W) tensors")
        sizes = sorted({tuple(x.shape) for x in images})
        if len(sizes) > 1:
            raise ValueError(f"a batch mixes image sizes {sizes}: pass PIL images (the model's preprocessing resizes "
                             "them) or tensors of one size")
        return self._check_batch(torch.stack(images))

    def _from_pil(self, image: Any, number: int) -> Tensor:
        if image.mode not in CONVERTIBLE_MODES:
            raise ValueError(f"image {number} has PIL mode {image.mode!r}, which has no faithful RGB conversion; "
                             "convert it to 'RGB' (or 'L' for grayscale) first")
        if image.mode != "RGB":
            image = image.convert("RGB")  # grayscale replicated, alpha dropped
        return self.preprocess(image)

    def _tensor(self, image: Tensor, number: int) -> Tensor:
        if image.ndim != 3:
            raise ValueError(f"image {number} is a tensor of shape {tuple(image.shape)}; an image is (C, H, W)")
        if not image.is_floating_point():
            raise TypeError(f"image {number} is a {image.dtype} tensor: tensors are read as preprocessed pixels; pass "
                            "PIL images (the model's preprocessing runs) or float tensors normalised with the model's "
                            f"mean {self.mean} and std {self.std}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)  # grayscale: replicated over RGB
        if image.shape[0] != 3:
            raise ValueError(f"image {number} has {image.shape[0]} channels; the model reads 3 (RGB), or 1 "
                             "(grayscale, replicated)")
        return image

    def _check_batch(self, pixels: Tensor) -> Tensor:
        if not pixels.numel():
            raise ValueError("no images given: pass a non-empty list of PIL images or image tensors")
        if not bool(torch.isfinite(pixels).all()):
            raise ValueError("images hold NaN or inf values")
        if self.fixed_size and tuple(pixels.shape[1:]) != self.input_size:
            raise ValueError(f"images of size {tuple(pixels.shape[1:])}, but {type(self.backbone).__name__} reads "
                             f"{self.input_size}: pass PIL images (its preprocessing resizes them) or resize tensors")
        return pixels

    def _warn_if_raw(self, pixels: Tensor) -> None:
        """A caller's tensor: normalised pixels span about [-mean/std, (1-mean)/std] (a photo reaches below 0);
        raw ones sit in [0, 1] with the contrast of a photo, or in [0, 255]."""
        if all(abs(m) < 1e-6 for m in self.mean) and all(abs(s - 1) < 1e-6 for s in self.std):
            return  # the model reads raw [0, 1] pixels
        low, high = float(pixels.min()), float(pixels.max())
        top = max((1 - m) / s for m, s in zip(self.mean, self.std))
        if (low >= 0 and high <= 1 and high - low > 0.5) or high > 4 * top + 1:
            warnings.warn(f"image values span [{low:.3g}, {high:.3g}], which looks like raw pixels; "
                          f"{type(self.backbone).__name__} expects them normalised with mean {self.mean} and std "
                          f"{self.std} (pass PIL images to have the model's preprocessing do it)",
                          UnnormalisedImageWarning, stacklevel=4)

    # ------------------------------------------------------------------ which positions speak
    def positions(self, model: nn.Module) -> MaskFn | None:
        if self.scope == "all":
            return None
        prefix, scope = self.n_prefix, self.scope

        def mask(_args: tuple, _kwargs: dict) -> Callable[[int, int, torch.device], Tensor]:
            return lambda batch, tokens, device: scope_mask(scope, prefix, batch, tokens, device)

        return mask


def scope_mask(scope: str, prefix: int, batch: int, tokens: int, device: torch.device) -> Tensor:
    """(batch, tokens) bool: the class token ("cls"), the tokens after the `prefix` class/register tokens
    ("patches"), or all."""
    where = torch.arange(tokens, device=device)
    if scope == "cls":
        keep = where == 0
    elif scope == "patches":
        keep = where >= prefix
    else:
        keep = torch.ones(tokens, dtype=torch.bool, device=device)
    return keep[None].expand(batch, tokens)


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "mode") and hasattr(x, "convert")


def _dtype_of(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def as_tokens(hidden: Tensor) -> Tensor:
    """(batch, tokens, d) from a ViT's tokens or a CNN's (batch, channels, height, width) map (positions as tokens)."""
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2)
    if hidden.ndim != 3:
        raise ValueError(f"the hookpoint gives shape {tuple(hidden.shape)}; expected (batch, tokens, d) or a "
                         "(batch, channels, height, width) feature map")
    return hidden


@torch.no_grad()
def harvest_tokens(model: nn.Module, hookpoint: str, images: Any, *, batch_size: int = 64,
                   preprocess: Callable[[Any], Tensor] | None = None) -> Tensor:
    """(n_images * tokens, d) activations of `images` at `hookpoint`, through the model's own preprocessing: what an
    SAE on an image model trains on (every position; a token scope chooses among them when the SAE is attached)."""
    from ..hooks.capture import capture_hidden  # noqa: PLC0415
    from ..hooks.hookpoints import find_hookpoint  # noqa: PLC0415

    adapter, point = VisionAdapter(model, preprocess=preprocess), find_hookpoint(model, hookpoint)
    chunks = [as_tokens(capture_hidden(point, *adapter.prepare(model, batch).args)).float()
              for batch in image_batches(images, batch_size)]
    return torch.cat(chunks).flatten(0, 1)


def image_batches(images: Any, size: int) -> list[Any]:
    """`images` (a list, or a (B, 3, H, W) tensor) in batches of `size`; none at all is refused."""
    if isinstance(images, Tensor):
        if images.ndim == 3:
            images = images[None]
        batches = [images[i:i + size] for i in range(0, len(images), size)]
    elif images is None or not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(f"images must be a list of PIL images or image tensors, or a (B, 3, H, W) tensor; got "
                        f"{type(images).__name__}")
    else:
        batches = [list(images[i:i + size]) for i in range(0, len(images), size)]
    if not batches:
        raise ValueError("no images given: pass a non-empty list of PIL images or image tensors")
    return batches
