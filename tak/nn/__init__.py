"""Dual layers: modules that carry (primal, tangent) pairs for linearized models.

Each layer holds frozen base parameters θ0 (buffers) and trainable tangent directions τ of the same
shapes (``layer.tau``, zeros at start, its only parameters), and maps ``(x, dx=None) -> (y, dy)``.
One model definition serves three modes (see ``tak.nn.base``): "linearized" (y = f(x; θ0) and
dy = J f · (dx, τ)), "primal" (y = f(x; θ0), dy None) and "merged" (y = f(x; θ0 + τ), dy None).
"""
from .activation import DualActivation
from .attention import DualAttention, attention, dual_attention
from .base import MODES, DualModule, set_mode
from .dropout import DualDropout, DualPatchDropout
from .linear import DualConv1D, DualEmbedding, DualLayerScale, DualLinear, DualPatchEmbedding, linear
from .norm import DualLayerNorm, DualRMSNorm, layer_norm, rms_norm

__all__ = [
    "MODES", "DualModule", "set_mode",
    "DualLinear", "DualConv1D", "DualPatchEmbedding", "DualEmbedding", "DualLayerScale", "linear",
    "DualLayerNorm", "DualRMSNorm", "layer_norm", "rms_norm",
    "DualActivation", "DualDropout", "DualPatchDropout",
    "DualAttention", "attention", "dual_attention",
]
