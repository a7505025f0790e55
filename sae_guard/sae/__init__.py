"""The dictionary layer: SAE base class, variant registry, sparse codes, losses, metrics, files."""

from . import variants  # noqa: F401  (registers the architectures)
from .base import SAE
from .codes import SparseCodes, dense_to_sparse, discrete_codes, sparse_decode
from .config import SAEConfig
from .io import SAEFormatError
from .registry import architectures, register

__all__ = [
    "SAE", "SAEConfig", "SAEFormatError", "SparseCodes", "architectures", "dense_to_sparse",
    "discrete_codes", "register", "sparse_decode",
]
