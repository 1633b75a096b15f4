"""Dual elementwise activations, optionally gated: y = f(x) ⊙ h, dy = f'(x) ⊙ dx ⊙ h + f(x) ⊙ dh.

With a tangent this is ``kfac_kernels.dual_activation`` (one fused op on CUDA): y is a constant, and
only x and h are kept, from which the backward of dy recomputes f(x) and f'(x).
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

    def forward(self, x, dx=None, gate=None, dgate=None):
        """(f(x) ⊙ h, f'(x) ⊙ dx ⊙ h + f(x) ⊙ dh) for an optional gate h (None: 1) and its tangent dh."""
        if dx is None and dgate is None:
            y = ACTIVATIONS[self.kind](x)
            return (y if gate is None else y * gate), None
        return kk.dual_activation(x, dx, self.kind, gate=gate, dgate=dgate)

    def extra_repr(self):
        return f"kind={self.kind!r}"

