"""Training runs: ``train(config)`` (exported as ``tak.train``) and its ``TrainConfig``."""
from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
