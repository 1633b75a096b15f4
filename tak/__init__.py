"""tak: task arithmetic with Kronecker-factored curvature (TAK and DELTA), built on kfac_kernels.

Today: curvature factors (``fit_kfac``, ``fit_ekfac``, ``merge_kfac``, ``compress``) and linearized
models (``linearize``); training, merging and evaluation land in later releases. Layering (one
direction): kfac_kernels <- tak.nn <- tak.models <- tak.curvature <- tak.methods <- tak.train /
tak.arithmetic <- tak.cli.
"""
from .curvature import (EKFAC, KFAC, DiagonalGGN, TaskFactors, compress, fit_diagonal, fit_ekfac, fit_kfac, merge_kfac,
                        merge_kfac_except)
from .linearize import LinearizedModel, linearize

__all__ = ["KFAC", "EKFAC", "DiagonalGGN", "TaskFactors", "fit_kfac", "fit_ekfac", "fit_diagonal", "merge_kfac",
           "merge_kfac_except", "compress", "LinearizedModel", "linearize"]
