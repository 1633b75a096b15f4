"""Kronecker quadratic forms: the KFAC / EK-FAC penalty of a task vector, without forming B ⊗ A.

    quadratic_form(τ, B, A)            q = vec(τ)ᵀ (B ⊗ A) vec(τ) = Σ τ ⊙ (B τ A),   ∇q = 2 B τ A
    eigen_quadratic_form(τ, U_B, U_A, S)   q = Σ S ⊙ (U_Bᵀ τ U_A)²,   ∇q = 2 U_B (S ⊙ M) U_Aᵀ

τ is (d_out, d_in); B (d_out × d_out) and A (d_in × d_in) are symmetric: dense tensors or the
compressed factors of ``kfac_kernels.factors``. The result is a 0-dim fp32 tensor (fp64 when every
input is fp64), differentiable in τ; factors are constants. The gradient is the forward's own
product B τ A, saved by the forward, so the backward does no matrix work. Under
``create_graph=True`` the backward instead recomputes the gradient from τ (kept by the forward when
it is a leaf tensor) with the PyTorch reference ops, so second derivatives (Hessian-vector products
2 B v A) are exact; a τ computed by an op gets a clear error there.

Each layer is multiplied in ``_precision.compute_dtype`` of its own τ and factors, with
``keep_fp32``: float16 τ with a float32 factor multiplies in float32 (the factor's entries can
exceed float16's range), bfloat16 with float32 in bfloat16. bfloat16 and float16 cannot meet within a
layer, but layers of a grouped call may each use their own half dtype.
"""
import torch

from . import _backend, _precision, _validate, reference
from .factors import factor_size


class _Forms(torch.autograd.Function):
    """Runs ``compute() -> (total, saved)`` and, for the backward, ``finish(saved) -> grads``; under
    ``create_graph`` the backward takes ``differentiable(taus) -> grads`` instead (PyTorch ops of τ, so
    autograd differentiates the gradient again). Only leaf τ (parameters, alive anyway) are kept for
    that: keeping a τ built by an op (a [W | b] concatenation) would hold a copy until the backward."""

    @staticmethod
    def forward(ctx, compute, finish, differentiable, *taus):
        total, saved = compute()
        ctx.finish, ctx.differentiable = finish, differentiable
        ctx.needs = [t.requires_grad for t in taus]
        ctx.n_saved = 0 if saved is None else len(saved)
        ctx.save_for_backward(*(saved or ()), *(t if t.is_leaf else None for t in taus))
        return total

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        if torch.is_grad_enabled():  # create_graph=True: the gradient as a differentiable function of τ
            if any(t is None for t in saved[ctx.n_saved:]):
                raise RuntimeError("quadratic forms: second derivatives (create_graph=True) need every τ to be a leaf "
                                   "tensor (e.g. a parameter); a τ computed by an op is not kept for them")
            grads = [gr * g for gr in ctx.differentiable(saved[ctx.n_saved:])]
        else:
            grads = torch._foreach_mul(ctx.finish(saved[:ctx.n_saved]), g)
        return None, None, None, *(gr if need else None for gr, need in zip(grads, ctx.needs))


def _weights(op: str, weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, torch.Tensor) and (weights.dim() != 1 or weights.requires_grad):
        raise ValueError(f"{op}: weights must be constants, one per layer: a 1-D tensor without grad or a "
                         f"sequence of numbers, got a tensor of shape {tuple(weights.shape)} "
                         f"(requires_grad={weights.requires_grad})")
    if not isinstance(weights, torch.Tensor) and not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a sequence of numbers, one per layer, got {type(weights).__name__}")
    w = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    for i, x in enumerate(w):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise ValueError(f"{op}: weights must be constants, one per layer, but weights[{i}] is a tensor that "
                             f"requires grad (its gradient would be dropped); pass weights[{i}].detach() or a number")
    if len(w) != n:
        raise ValueError(f"{op}: weights has {len(w)} entries for {n} layers")
    return [float(x) for x in w]


def _layers(op: str, **lists) -> int:
    for name, x in lists.items():
        if isinstance(x, (torch.Tensor, dict, str)) or not hasattr(x, "__len__"):
            raise TypeError(f"{op}: {name} must be a list or tuple with one tensor per layer, got {type(x).__name__}")
    lengths = {name: len(x) for name, x in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{op}: needs one entry per layer in each list, got lengths {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"{op}: needs at least one layer")
    return n


def _check_layer(op: str, i: int, tau, B, A) -> torch.dtype:
    """Checks layer i (None: the only one); returns the dtype it is multiplied in."""
    tag = "" if i is None else f"[{i}]"
    _validate.tensor(op, f"tau{tag}", tau, ndim=2)
    nb = factor_size(op, f"B{tag}", B)
    na = factor_size(op, f"A{tag}", A)
    if (nb, na) != tuple(tau.shape):
        raise ValueError(f"{op}: tau{tag} of shape {tuple(tau.shape)} needs B{tag} of size {tau.shape[0]} and "
                         f"A{tag} of size {tau.shape[1]}, got B{tag} {tuple(B.shape)} and A{tag} {tuple(A.shape)}")
    _validate.same_device(op, **{f"tau{tag}": tau, f"B{tag}": B, f"A{tag}": A})
    _validate.no_grad_needed(op, **{f"B{tag}": B, f"A{tag}": A})
    return _precision.compute_dtype(op, keep_fp32=True, **{f"tau{tag}": tau.dtype, f"B{tag}": B.dtype,
                                                           f"A{tag}": A.dtype})


def _apply(op, taus, factor_dtypes, compute_dtypes, torch_fn, triton_fn, triton_finish):
    """Chooses the backend and runs the forms through ``_Forms``; ``compute_dtypes``: one per layer.
    ``torch_fn(taus, want, dtype)`` is the PyTorch reference, also the gradient under create_graph."""
    device = _validate.same_device(op, **{f"tau[{i}]": t for i, t in enumerate(taus)})
    dtypes = [t.dtype for t in taus] + factor_dtypes
    backend = _backend.select(op, device, dtypes)
    want = torch.is_grad_enabled() and any(t.requires_grad for t in taus)
    dtype = torch.float64 if set(compute_dtypes) == {torch.float64} else torch.float32
    if backend == "torch":
        compute, finish = (lambda: torch_fn(taus, want, dtype)), (lambda saved: saved)
    else:
        compute, finish = (lambda: triton_fn(want)), triton_finish
    return _Forms.apply(compute, finish, lambda ts: torch_fn(ts, True, dtype)[1], *taus)


def quadratic_forms(taus, Bs, As, weights=None) -> torch.Tensor:
    """Σ_l w_l q_l(τ_l) over many layers in one call (grouped launches).

    taus[l] (d_out_l, d_in_l), Bs[l] (d_out_l²), As[l] (d_in_l²); weights: floats (default 1)."""
    return _quadratic_forms("quadratic_forms", taus, Bs, As, weights)


def quadratic_form(tau, B, A) -> torch.Tensor:
    """q = vec(τ)ᵀ (B ⊗ A) vec(τ) = Σ τ ⊙ (B τ A) for τ (d_out, d_in), B (d_out²), A (d_in²) symmetric."""
    return _quadratic_forms("quadratic_form", [tau], [B], [A], None)


def _quadratic_forms(op: str, taus, Bs, As, weights) -> torch.Tensor:
    n = _layers(op, taus=taus, Bs=Bs, As=As)
    cts = [_check_layer(op, i if n > 1 else None, tau, B, A) for i, (tau, B, A) in enumerate(zip(taus, Bs, As))]
    w = _weights(op, weights, n)
    taus = list(taus)

    def triton_fn(want):
        from .triton_kernels import quadratic
        return quadratic.quadratic_forms(taus, Bs, As, w, want)

    return _apply(op, taus, [F.dtype for F in (*Bs, *As)], cts,
                  lambda ts, want, dtype: reference.quadratic_forms(ts, Bs, As, w, want, dtype),
                  triton_fn, lambda saved: saved)


def eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights=None) -> torch.Tensor:
    """Σ_l w_l Σ S_l ⊙ (U_B,lᵀ τ_l U_A,l)² (EK-FAC), in one call.

    taus[l] (d_out, d_in), U_Bs[l] (d_out, r_B), U_As[l] (d_in, r_A), Ss[l] (r_B, r_A)."""
    return _eigen_quadratic_forms("eigen_quadratic_forms", taus, U_Bs, U_As, Ss, weights)


def eigen_quadratic_form(tau, U_B, U_A, S) -> torch.Tensor:
    """q = Σ S ⊙ (U_Bᵀ τ U_A)² for τ (d_out, d_in), U_B (d_out, r_B), U_A (d_in, r_A), S (r_B, r_A)."""
    return _eigen_quadratic_forms("eigen_quadratic_form", [tau], [U_B], [U_A], [S], None)


def _eigen_quadratic_forms(op: str, taus, U_Bs, U_As, Ss, weights) -> torch.Tensor:
    n = _layers(op, taus=taus, U_Bs=U_Bs, U_As=U_As, Ss=Ss)
    cts = []
    for i, (tau, U_B, U_A, S) in enumerate(zip(taus, U_Bs, U_As, Ss)):
        tag = "" if n == 1 else f"[{i}]"
        _validate.tensor(op, f"tau{tag}", tau, ndim=2)
        _validate.tensor(op, f"U_B{tag}", U_B, ndim=2)
        _validate.tensor(op, f"U_A{tag}", U_A, ndim=2)
        _validate.tensor(op, f"S{tag}", S, ndim=2)
        if (U_B.shape[0], U_A.shape[0]) != tuple(tau.shape) or tuple(S.shape) != (U_B.shape[1], U_A.shape[1]):
            raise ValueError(f"{op}: tau{tag} {tuple(tau.shape)}, U_B{tag} {tuple(U_B.shape)}, U_A{tag} "
                             f"{tuple(U_A.shape)} and S{tag} {tuple(S.shape)} do not fit: need U_B (d_out, r_B), "
                             f"U_A (d_in, r_A), S (r_B, r_A) for tau (d_out, d_in)")
        _validate.same_device(op, **{f"tau{tag}": tau, f"U_B{tag}": U_B, f"U_A{tag}": U_A, f"S{tag}": S})
        _validate.no_grad_needed(op, **{f"U_B{tag}": U_B, f"U_A{tag}": U_A, f"S{tag}": S})
        cts.append(_precision.compute_dtype(op, keep_fp32=True, **{f"tau{tag}": tau.dtype, f"U_B{tag}": U_B.dtype,
                                                                   f"U_A{tag}": U_A.dtype, f"S{tag}": S.dtype}))
    w = _weights(op, weights, n)
    taus = list(taus)

    def triton_fn(want):
        from .triton_kernels import quadratic
        return quadratic.eigen_quadratic_forms(taus, U_Bs, U_As, Ss, w, want)

    def finish_triton(Gs):
        from .triton_kernels import quadratic
        return quadratic.eigen_backward(Gs, U_Bs, U_As, taus)

    return _apply(op, taus, [U.dtype for U in (*U_Bs, *U_As, *Ss)], cts,
                  lambda ts, want, dtype: reference.eigen_quadratic_forms(ts, U_Bs, U_As, Ss, w, want, dtype),
                  triton_fn, finish_triton)

