"""sae_guard: sparse autoencoders patched into live models as concept classifiers and gates."""

from .sae import SAE, SAEConfig, SparseCodes, architectures, discrete_codes
from .train import TrainResult, harvest, train
from .concepts import Concept, Verdict
from .hooks.gate import Edit
from .adapters.guard import Guard, guard

__version__ = "0.1.0"

__all__ = [
    "SAE", "SAEConfig", "SparseCodes", "architectures", "discrete_codes", "train", "TrainResult", "harvest",
    "Concept", "Edit", "Guard", "Verdict", "guard", "__version__",
]
