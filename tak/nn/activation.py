"""Dual elementwise activations: y = f(x), dy = f'(x) ⊙ dx.

With a tangent this is ``kfac_kernels.dual_activation`` (one fused op on CUDA): y is a constant, and
only x is kept, from which the backward of dy recomputes f'(x).
"""
from torch import nn

import kfac_kernels as kk
from kfac_kernels.activation import ACTIVATIONS


class DualActivation(nn.Module):
    """The activation ``kind``, one of ``kfac_kernels.activation.ACTIVATIONS``: x (...) -> y (...)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: unknown activation {kind!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.kind = kind

    def forward(self, x, dx=None):
        if dx is None:
            return ACTIVATIONS[self.kind](x), None
        return kk.dual_activation(x, dx, self.kind)

    def extra_repr(self):
        return f"kind={self.kind!r}"

