"""Training runs: ``train(config)`` (exported as ``tak.train``) and its ``TrainConfig``; ``fit(config, kind, path)``:
a task's factor file, shared in place of its data."""
from .config import TrainConfig
from .loop import TrainResult, fit, train
from .signals import TrainingInterrupted

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "fit", "train"]
