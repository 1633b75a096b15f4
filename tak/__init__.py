"""tak: task arithmetic with Kronecker-factored curvature (TAK and DELTA), built on kfac_kernels.

Curvature factors (``fit_kfac``, ``fit_ekfac``, ``merge_kfac``, ``compress``), linearized models
(``linearize``), training (``train(config)`` with ``TrainConfig``; the methods in ``tak.methods``),
task vectors (``TaskVector``), and their arithmetic (``tak.arithmetic``: addition, negation, merges,
analyses, reports). Layering (one direction): kfac_kernels <- tak.nn <- tak.models <- tak.curvature
<- tak.backbones / tak.data <- tak.methods <- tak.training / tak.arithmetic <- tak.demo / tak.cli.
Heavy modules (training, backbones) load on first use, so ``import tak`` stays light.
"""
from .curvature import (EKFAC, KFAC, DiagonalGGN, TaskFactors, compress, fit_diagonal, fit_ekfac, fit_kfac, merge_kfac,
                        merge_kfac_except)
from .linearize import LinearizedModel, linearize
from .task_vector import TaskVector


def train(config):
    """Train one task vector (``tak.training.train``): ``config`` is a ``TrainConfig``, a dict or a YAML path."""
    from .training import train as run

    return run(config)


def __getattr__(name):
    if name == "TrainConfig":
        from .training import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'tak' has no attribute {name!r}")


__all__ = ["train", "TrainConfig", "TaskVector", "KFAC", "EKFAC", "DiagonalGGN", "TaskFactors", "fit_kfac", "fit_ekfac", "fit_diagonal", "merge_kfac",
           "merge_kfac_except", "compress", "LinearizedModel", "linearize"]
