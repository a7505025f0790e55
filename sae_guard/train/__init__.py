"""Training: activation streams, the training loop, checkpoints, and harvesting from models."""

import sys
import types

from .harvest import Harvest, harvest
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["Harvest", "TrainResult", "TrainingDiverged", "harvest", "train"]


class _TrainPackage(types.ModuleType):
    """`sae_guard.train` names both this package and the training function: importing the package (which Python
    binds as the attribute `sae_guard.train`) must leave `sae_guard.train(sae, data, ...)` working."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _TrainPackage
