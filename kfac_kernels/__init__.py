"""kfac_kernels: fused Kronecker-factored curvature kernels.

Conventions (see DESIGN.md): a linear layer's weight and its task-vector block τ have shape
(d_out, d_in); ``vec`` is row-major; its curvature block is B ⊗ A with B (d_out × d_out) and
A (d_in × d_in) symmetric, so q(τ) = vec(τ)ᵀ(B⊗A)vec(τ) = trace(τᵀ B τ A) = Σ τ ⊙ (B τ A).

Importing this package never touches CUDA and never needs Triton.
"""
from .activation import dual_activation
from .attention import dual_attention
from .correction import squared_products_update_
from .covariance import covariance_update_
from .dual import dual_linear
from .factors import BlockDiagonalFactor, Int8Factor, LowRankFactor
from .norm import dual_layer_norm, dual_rms_norm
from .quadratic import eigen_quadratic_form, eigen_quadratic_forms, quadratic_form, quadratic_forms

__version__ = "0.1.0"

__all__ = [
    "BlockDiagonalFactor", "Int8Factor", "LowRankFactor",
    "quadratic_form", "quadratic_forms", "eigen_quadratic_form", "eigen_quadratic_forms",
    "covariance_update_", "squared_products_update_",
    "dual_linear", "dual_attention", "dual_layer_norm", "dual_rms_norm", "dual_activation",
]
