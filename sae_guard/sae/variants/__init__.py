"""Every SAE architecture. Importing this package registers them all."""

from . import topk  # noqa: F401
