"""EK-FAC corrected-eigenvalue accumulation: S += scale · Σ_n (g_nᵀ a_n)², no per-example product kept.

For example n with rotated pseudo-gradient rows g_n = [U_Bᵀ g_{n,t}]_t (T × r_B) and rotated input rows
a_n = [U_Aᵀ ã_{n,t}]_t (T × r_A), g_nᵀ a_n = U_Bᵀ G_n U_A with G_n = Σ_t g_{n,t} ã_{n,t}ᵀ, so
Σ_n (g_nᵀ a_n)² (elementwise square) is N times EK-FAC's corrected eigenvalues S (DESIGN.md,
"Math conventions").
"""
import math
import numbers

import torch

from . import _backend, _precision, _validate

_OP = "squared_products_update_"

# Most elements of per-example products (examples × r_B × r_A) the torch backend materializes at once.
_CHUNK_ELEMENTS = 1 << 26


def squared_products_update_(S, g, a, *, scale=1.0):
    """In place ``S += scale · Σ_n (g_nᵀ a_n)²`` (elementwise square); returns S.

    g (N, T, r_B) and a (N, T, r_A) hold T rows per example n (tokens), so g_nᵀ a_n = Σ_t g_{n,t} a_{n,t}ᵀ
    is an (r_B, r_A) matrix; 2-D g (N, r_B) and a (N, r_A) are T = 1: then (g_nᵀ a_n)² = (g_n²)ᵀ (a_n²)
    and the sum is one product of the squares. S is (r_B, r_A), float32 (float64 on the torch backend)
    and contiguous. g and a are float16/bfloat16/float32 (float64 on the torch backend), any strides,
    and may differ in dtype (not float16 with bfloat16): the tokens' products are multiplied in
    ``_precision.compute_dtype`` of g and a, accumulated in fp32, and squared and summed in fp32; fp32
    follows ``torch.get_float32_matmul_precision()``. The 2-D form squares in fp32 and multiplies the
    squares as fp32 (the matmul precision). ``scale`` is a Python number. N = 0 or T = 0 leaves S as is.

    The Triton kernel never materializes a per-example product; the torch backend builds them in
    chunks of at most ``_CHUNK_ELEMENTS`` elements. Not differentiable: g and a are read as constants and
    S, which must not require grad, gets no autograd history (like ``covariance_update_``).
    """
    ct = _check(S, g, a, scale)
    if g.dim() == 3 and g.shape[1] == 1:  # one token per example: the 2-D form
        g, a = g[:, 0], a[:, 0]
    if g.shape[0] == 0 or (g.dim() == 3 and g.shape[1] == 0) or S.numel() == 0:
        return S
    _update(S, g, a, float(scale), ct)
    return S


@torch.library.custom_op("kfac_kernels::squared_products_update", mutates_args=("S",))
def _update(S: torch.Tensor, g: torch.Tensor, a: torch.Tensor, scale: float, ct: torch.dtype) -> None:
    """S += scale · Σ_n (g_nᵀ a_n)² in place, products in ``ct`` (see ``squared_products_update_``)."""
    if _select(S.device, S, g, a) == "torch":
        _torch_update(S, g, a, scale, ct)
    else:
        from .triton_kernels.correction import squared_products_update_ as triton_update
        triton_update(S, g, a, scale, ct)


def _check(S, g, a, scale):
    """Validate the arguments (and the backend); return the compute dtype."""
    _validate.tensor(_OP, "S", S, ndim=2, dtypes=(torch.float32, torch.float64))
    _validate.accumulator(_OP, "S", S)
    _validate.tensor(_OP, "g", g)
    _validate.tensor(_OP, "a", a)
    if g.dim() not in (2, 3):
        raise ValueError(f"{_OP}: g must be 3-D (N, T, r_B) or 2-D (N, r_B), got shape {tuple(g.shape)}")
    if a.dim() != g.dim():
        raise ValueError(f"{_OP}: a must be {g.dim()}-D like g, (N, T, r_A) or (N, r_A), got a of shape "
                         f"{tuple(a.shape)} and g of shape {tuple(g.shape)}")
    if a.shape[:-1] != g.shape[:-1]:
        what = "N and T" if g.dim() == 3 else "N"
        raise ValueError(f"{_OP}: g and a must have the same {what}, got g of shape {tuple(g.shape)} and a of "
                         f"shape {tuple(a.shape)}")
    r_B, r_A = g.shape[-1], a.shape[-1]
    if S.shape != (r_B, r_A):
        raise ValueError(f"{_OP}: S must have shape (r_B, r_A) = ({r_B}, {r_A}) for g of shape {tuple(g.shape)} "
                         f"and a of shape {tuple(a.shape)}, got {tuple(S.shape)}")
    if not S.is_contiguous():
        raise ValueError(f"{_OP}: S must be contiguous (it is updated in place), got strides {S.stride()}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{_OP}: scale must be a Python number, got {_validate.describe(scale)}")
    _select(_validate.same_device(_OP, S=S, g=g, a=a), S, g, a)
    return _precision.compute_dtype(_OP, g=g.dtype, a=a.dtype)


def _select(device, S, g, a) -> str:
    return _backend.select(_OP, device, [g.dtype, a.dtype, S.dtype])


@torch.no_grad()
def _torch_update(S, g, a, scale, ct):
    """Reference: operands rounded to the compute dtype, then products in fp32 (float64 if any of S, g,
    a is), per-example products built by ``torch.bmm`` in chunks of examples; autocast off (an
    enclosing ``torch.autocast`` would multiply in bf16/fp16)."""
    acc = torch.float64 if torch.float64 in (S.dtype, g.dtype, a.dtype) else torch.float32
    with _precision.no_autocast(S.device):
        g, a = g.to(ct).to(acc), a.to(ct).to(acc)
        if g.dim() == 2:
            S.add_((g.square().T @ a.square()).to(S.dtype), alpha=scale)
            return
        total = torch.zeros(S.shape, dtype=acc, device=S.device)
        step = max(1, _CHUNK_ELEMENTS // math.prod(S.shape))
        for i in range(0, g.shape[0], step):
            total += torch.bmm(g[i:i + step].transpose(1, 2), a[i:i + step]).square_().sum(0)
        S.add_(total.to(S.dtype), alpha=scale)
