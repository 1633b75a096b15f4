"""``dual_attention``: multi-head attention and its forward-mode tangent (JVP) in one fused op.

Per batch and head, with S = Q Kᵀ·scale + bias (entries where mask is False removed), P = softmax(S):

    O = P V,   Ȯ = (P⊙Ṡ) V − rowsum(P⊙Ṡ) ⊙ O + P V̇,   Ṡ = (Q̇ Kᵀ + Q K̇ᵀ)·scale + ḃias,

the JVP of (Q, K, V, bias) ↦ O along (Q̇, K̇, V̇, ḃias). The primal point is frozen (θ0 of a linearized
model): O is a constant and Ȯ is differentiable in the tangents only, its backward being

    grad Ṡ = P ⊙ (G Vᵀ − rowsum(G ⊙ O)),  grad V̇ = Pᵀ G,  grad Q̇ = grad Ṡ K·scale,
    grad K̇ = grad Ṡᵀ Q·scale,  grad ḃias = grad Ṡ  (G = ∂loss/∂Ȯ).

With ``softcap`` c, the products are capped (Gemma 2; the bias, a mask, adds after the cap as in Hugging Face's
models): S = c·tanh(Q Kᵀ·scale / c) + bias, whose tangent is Ṡ = (1 − t²) ⊙ (Q̇ Kᵀ + Q K̇ᵀ)·scale + ḃias with
t = tanh(Q Kᵀ·scale / c); grad Q̇ and grad K̇ take (1 − t²) ⊙ grad Ṡ in place of grad Ṡ.

A query row with no key left (all masked, or an all −∞ bias) gets O = Ȯ = 0.
"""
import torch

from . import _backend, _precision, _validate

OP = "dual_attention"
MAX_HEAD_DIM = 256  # of the Triton kernels


def dual_attention(q, k, v, dq, dk, dv, *, mask=None, bias=None, dbias=None, scale=None, softcap=None):
    """``(o, do)``: attention O (B, H, Lq, Dv) and its tangent Ȯ (same shape; None when every tangent is None).

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); tangents dq, dk, dv of the same shapes or None
    (zero). mask: bool, True = attend; bias and its tangent dbias: floating; each broadcastable to
    (B, H, Lq, Lk) (key padding (B, 1, 1, Lk), causal (Lq, Lk), T5's relative bias (1, H, Lq, Lk)) or
    None. ``scale`` defaults to D^(-1/2); ``softcap`` (a float > 0, or None) caps the products (module
    docstring). q, k, v and bias must not require grad; do is differentiable in dq, dk, dv and dbias. Operands
    are multiplied in ``_precision.compute_dtype`` of the floating inputs with fp32 accumulation, and o, do
    come out in that dtype. On CUDA, FlashAttention-style Triton kernels never hold P for more than one tile;
    the PyTorch reference forms P.
    """
    ct, backend, scale = _check(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap)
    softcap = 0.0 if softcap is None else float(softcap)
    if backend == "torch":
        return _reference(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct)
    from .triton_kernels import dual_attention as tk
    if dq is None and dk is None and dv is None and dbias is None:
        return tk.forward(q, k, v, None, None, None, mask, bias, None, scale, softcap, ct)[0], None
    return tk.DualAttention.apply(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct)


def _check(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap):
    """Validate the arguments; return the compute dtype, the backend and the scale."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"{OP}: softcap must be a finite number > 0 or None, got {softcap!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(OP, name, t, ndim=4)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"{OP}: k must have shape (B, H, Lk, D) = ({B}, {H}, Lk, {D}) to match q of shape "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{OP}: v must have shape (B, H, Lk, Dv) = ({B}, {H}, {Lk}, Dv) to match k of shape "
                         f"{tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t, primal in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t is not None and _validate.tensor(OP, name, t).shape != primal.shape:
            raise ValueError(f"{OP}: {name} must have the shape of {name[1:]}, {tuple(primal.shape)}, "
                             f"got {tuple(t.shape)}")
    full = (B, H, Lq, Lk)
    for name, t in (("mask", mask), ("bias", bias), ("dbias", dbias)):
        if t is None:
            continue
        _validate.tensor(OP, name, t, dtypes=(torch.bool,) if name == "mask" else _validate.FLOATS)
        try:
            fits = t.dim() <= 4 and torch.broadcast_shapes(t.shape, full) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{OP}: {name} must be broadcastable to (B, H, Lq, Lk) = {full}, got {tuple(t.shape)}")
    named = dict(q=q, k=k, v=v, dq=dq, dk=dk, dv=dv, mask=mask, bias=bias, dbias=dbias)
    device = _validate.same_device(OP, **named)
    _validate.constant_primal(OP, q=q, k=k, v=v, bias=bias)
    scale = (D ** -0.5 if D else 1.0) if scale is None else float(scale)  # D = 0: every score is 0 anyway
    ct = _precision.compute_dtype(OP, **{n: t.dtype for n, t in named.items() if t is not None and n != "mask"})
    backend = _backend.select(OP, device, [ct])
    if backend == "triton":
        if max(D, v.shape[3]) > MAX_HEAD_DIM:
            raise ValueError(f"{OP}: the Triton kernels take head dims up to {MAX_HEAD_DIM}, got D={D}, "
                             f"Dv={v.shape[3]} (KFAC_KERNELS_BACKEND=torch runs the PyTorch reference)")
        _check_offsets(named, full, max(D, v.shape[3]))
    return ct, backend, scale


def _check_offsets(named: dict, full: tuple, width: int) -> None:
    """The Triton kernels address within one (batch, head) slice in int32: refuse a slice of an input, of the
    (B, H, Lq, Lk) broadcast of mask, bias and dbias, or of an output (laid out (B, L, H, ``width``)) that
    reaches 2³¹ elements."""
    _, H, Lq, Lk = full
    reach = {"the outputs": (max(Lq, Lk) - 1) * H * width + width - 1}
    for name, t in named.items():
        if t is not None:
            t = torch.broadcast_to(t, full) if name in ("mask", "bias", "dbias") else t
            reach[name] = sum((n - 1) * s for n, s in zip(t.shape[2:], t.stride()[2:]))
    name, largest = max(reach.items(), key=lambda item: item[1])
    if largest >= 2**31:
        raise ValueError(f"{OP}: one (batch, head) slice of {name} spans {largest + 1} elements, beyond the 2^31 "
                         "that the Triton kernels' int32 offsets reach (shorter sequences, or the mask and bias "
                         "as (B, 1, 1, Lk) key masks)")


def _reference(q, k, v, dq, dk, dv, mask, bias, dbias, scale, softcap, ct):
    """PyTorch backend: the math above with P formed, in fp32 (fp64 for fp64 inputs); (o, do) in ``ct``.
    Plain autograd gives the tangents' gradients (the primal inputs do not require grad). Autocast is off:
    an enclosing ``torch.autocast`` does not turn the fp32 products into bf16/fp16 ones."""
    with _precision.no_autocast(q.device):
        acc = torch.float64 if ct == torch.float64 else torch.float32
        q, k, v, dq, dk, dv, bias, dbias = (None if t is None else t.to(acc) for t in (q, k, v, dq, dk, dv, bias, dbias))
        s, slope = (q @ k.mT) * scale, 1.0
        if softcap:
            t = torch.tanh(s / softcap)
            s, slope = softcap * t, 1 - t.square()
        if bias is not None:
            s = s + bias
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1).masked_fill(torch.isneginf(s).all(-1, keepdim=True), 0.0)
        o = p @ v
        terms = [t for t in (None if dq is None else (dq @ k.mT) * scale * slope,
                             None if dk is None else (q @ dk.mT) * scale * slope, dbias) if t is not None]
        if not terms and dv is None:
            return o.to(ct), None
        do = torch.zeros_like(o)
        if terms:
            psd = p * sum(terms)
            do = psd @ v - psd.sum(-1, keepdim=True) * o
        if dv is not None:
            do = do + p @ dv
        return o.to(ct), do.to(ct)
