"""Covariance accumulation for Kronecker factors: C += scale · X̃ᵀ X̃ in place, C exactly symmetric."""
import math
import numbers

import torch

from . import _backend, _precision, _validate

_OP = "covariance_update_"


def covariance_update_(C, X, *, scale=1.0, mask=None, append_ones=False):
    """In place ``C += scale · X̃ᵀ X̃``; returns C.

    X (..., D) is flattened to rows (N, D); X̃ keeps the rows where ``mask`` (bool, X.shape[:-1])
    is True (all when None) and, when ``append_ones``, gets a ones column as its last column, so
    C is (E, E) with E = D + append_ones. C is float32 (float64 on the torch backend) and
    contiguous; X is float16/bfloat16/float32 (float64 on the torch backend), read in its dtype
    and accumulated in fp32; fp32 X follows ``torch.get_float32_matmul_precision()``. Each
    off-diagonal value is computed once and written to (i, j) and (j, i), so a symmetric C stays
    exactly symmetric. ``scale`` is a Python number. Not differentiable: X is read as a constant (no gradient
    reaches it) and C, which must not require grad, gets no autograd history.
    """
    _validate.tensor(_OP, "C", C, ndim=2, dtypes=(torch.float32, torch.float64))
    _validate.accumulator(_OP, "C", C)
    _validate.tensor(_OP, "X", X)
    if X.dim() == 0:
        raise ValueError(f"{_OP}: X must have at least 1 dimension (..., D), got a 0-dim tensor")
    D = X.shape[-1]
    E = D + int(append_ones)
    if C.shape != (E, E):
        ones = " + 1 for append_ones" if append_ones else ""
        raise ValueError(
            f"{_OP}: C must have shape ({E}, {E}) for X of shape {tuple(X.shape)} (D = {D}{ones}), got {tuple(C.shape)}"
        )
    if not C.is_contiguous():
        raise ValueError(f"{_OP}: C must be contiguous (it is updated in place), got strides {C.stride()}")
    if mask is not None:
        _validate.tensor(_OP, "mask", mask, dtypes=(torch.bool,))
        if mask.shape != X.shape[:-1]:
            raise ValueError(
                f"{_OP}: mask must have shape X.shape[:-1] = {tuple(X.shape[:-1])}, got {tuple(mask.shape)}"
            )
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{_OP}: scale must be a Python number, got {_validate.describe(scale)}")
    device = _validate.same_device(_OP, C=C, X=X, mask=mask)
    _select(device, X, C)
    N = math.prod(X.shape[:-1])
    if N == 0 or E == 0:
        return C
    _update(C, X.reshape(N, D), None if mask is None else mask.reshape(N), append_ones, float(scale))
    return C


@torch.library.custom_op("kfac_kernels::covariance_update", mutates_args=("C",))
def _update(C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None, append_ones: bool, scale: float) -> None:
    """C += scale · X̃ᵀ X̃ in place for rows X (N, D) and mask (N,) or None (see ``covariance_update_``)."""
    backend = _select(C.device, X, C)
    if backend == "torch":
        _torch_update(C, X, mask, append_ones, scale)
    elif backend == "triton":
        from .triton_kernels.covariance import covariance_update_ as triton_update
        triton_update(C, X, mask, append_ones, scale)
    else:
        from . import cuda_ext
        cuda_ext.load().covariance_update(C, X, mask, append_ones, scale)


def _select(device, X, C) -> str:
    return _backend.select(_OP, device, [X.dtype, C.dtype], has_cuda_kernel=True)


@torch.no_grad()
def _torch_update(C, X, mask, append_ones, scale):
    """Reference: X̃ built explicitly in fp32 (float64 if C or X is), lower triangle mirrored; autocast off
    (an enclosing ``torch.autocast`` would multiply in bf16/fp16)."""
    dtype = torch.float64 if torch.float64 in (C.dtype, X.dtype) else torch.float32
    with _precision.no_autocast(C.device):
        X = X.to(dtype)
        if mask is not None:
            X = torch.where(mask[:, None], X, 0)
        if append_ones:
            ones = X.new_ones(X.shape[0], 1) if mask is None else mask[:, None].to(dtype)
            X = torch.cat([X, ones], dim=1)
        G = (X.T @ X).tril()
        G += G.tril(-1).T
        C.add_(G.to(C.dtype), alpha=scale)
