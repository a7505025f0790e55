"""Training: activation streams, the training loop, checkpoints, and harvesting from models."""

from .harvest import Harvest, harvest
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["Harvest", "TrainResult", "TrainingDiverged", "harvest", "train"]
