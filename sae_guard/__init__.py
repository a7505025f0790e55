"""sae_guard: sparse autoencoders patched into live models as concept classifiers and gates."""

from .sae import SAE, SAEConfig, SparseCodes, architectures, discrete_codes
from .train import TrainResult, train

__version__ = "0.1.0"

__all__ = ["SAE", "SAEConfig", "SparseCodes", "architectures", "discrete_codes", "train", "TrainResult", "__version__"]
