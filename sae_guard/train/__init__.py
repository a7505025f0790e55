"""Training: activation streams, the training loop, checkpoints, and harvesting from models."""

from .trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
