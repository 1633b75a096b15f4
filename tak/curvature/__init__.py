"""Kronecker-factored curvature of real models: fitting, storing, merging and compressing factors."""
from .kfac import KFAC, LayerFactors, fit_kfac
from .layers import Layer, find_layers

__all__ = ["KFAC", "LayerFactors", "fit_kfac", "Layer", "find_layers"]
