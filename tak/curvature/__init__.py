"""Kronecker-factored curvature of real models: fitting, storing, merging and compressing factors."""
from .compress import compress
from .dense import find_dense_groups
from .diagonal import DiagonalGGN, fit_diagonal
from .ekfac import EKFAC, EigenFactors, fit_ekfac
from .kfac import KFAC, DenseFactors, LayerFactors, fit_kfac
from .layers import Layer, find_layers
from .merge import TaskFactors, merge_kfac, merge_kfac_except, pool_kfac

__all__ = ["DiagonalGGN", "fit_diagonal", "KFAC", "LayerFactors", "DenseFactors", "fit_kfac", "EKFAC", "EigenFactors", "fit_ekfac",
           "find_dense_groups", "Layer", "find_layers",
           "merge_kfac", "merge_kfac_except", "pool_kfac", "TaskFactors", "compress"]
