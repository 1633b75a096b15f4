"""Kronecker quadratic forms: the KFAC / EK-FAC penalty of a task vector, without forming B ⊗ A.

    quadratic_form(τ, B, A)            q = vec(τ)ᵀ (B ⊗ A) vec(τ) = Σ τ ⊙ (B τ A),   ∇q = 2 B τ A
    eigen_quadratic_form(τ, U_B, U_A, S)   q = Σ S ⊙ (U_Bᵀ τ U_A)²,   ∇q = 2 U_B (S ⊙ M) U_Aᵀ

τ is (d_out, d_in); B (d_out × d_out) and A (d_in × d_in) are symmetric: dense tensors, diagonals given as 1-D
tensors, or the compressed factors of ``kfac_kernels.factors``; an eigenbasis U_A may be None, the identity (the
basis of a diagonal A). A layer with a diagonal factor or the identity basis is an elementwise scale and one
product, computed by the PyTorch reference ops under autograd beside the grouped call of the others. The result
is a 0-dim fp32 tensor (fp64 when every input is fp64), differentiable in τ; factors are constants. The gradient
is the forward's own product B τ A, saved by the forward, so the backward does no matrix work. Under
``create_graph=True`` the backward instead recomputes the gradient from τ (kept by the forward when
it is a leaf tensor) with the PyTorch reference ops, so second derivatives (Hessian-vector products
2 B v A) are exact; a τ computed by an op gets a clear error there.

Each layer is multiplied in ``_precision.compute_dtype`` of its own τ and factors, with
``float16_in_fp32``: bfloat16 in bfloat16 (also with float32 factors), else in float32 (tf32 at 'high'),
float16 layers included (as tf32 on the GPU, exact for float16 values): factors are second moments
(A ~ x²), and τ A, the low-rank (X U)·λ and the eigen form's S ⊙ M leave float16's range (65504) long
before τ or the factors do. bfloat16 and float16 cannot meet within a layer, but layers of a grouped
call may each use their own half dtype.

The forms are ``torch.library`` ops (``torch.ops.kfac_kernels.quadratic_forms``, ...): ``torch.compile``
traces them as opaque calls, with their shapes from the fake implementations below. Compressed factors
travel through them flattened (``factors.flatten``); the weights are constants of a compiled graph (a
list of numbers: new values recompile it).
"""
import torch
from torch import Tensor

from . import _backend, _precision, _validate, reference
from .factors import factor_size, flatten, is_diagonal, unflatten


# The grouped launches copy their job tables to the device: no CUDA graph capture of the forms.
_CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("kfac_kernels::quadratic_forms", mutates_args=(), tags=_CUDAGRAPH_UNSAFE)
def _forms(taus: list[Tensor], factors: list[Tensor], codes: list[int], weights: list[float], want_grad: bool,
           dtype: torch.dtype, op: str) -> tuple[Tensor, list[Tensor]]:
    """(Σ_l w_l ⟨τ_l, B_l τ_l A_l⟩ in ``dtype``, [2 w_l B_l τ_l A_l] in τ_l's layout if ``want_grad`` else []);
    ``factors, codes = flatten(Bs + As)``."""
    Fs = unflatten(factors, codes)
    Bs, As = Fs[:len(taus)], Fs[len(taus):]
    if _backend.select(op, taus[0].device, [t.dtype for t in (*taus, *Fs)]) == "torch":
        total, grads = reference.quadratic_forms(taus, Bs, As, weights, want_grad, dtype)
        grads = grads and [torch.empty_like(t).copy_(g) for t, g in zip(taus, grads)]
    else:
        from .triton_kernels import quadratic
        total, grads = quadratic.quadratic_forms(taus, Bs, As, weights, want_grad)
    return total, grads or []


@_forms.register_fake
def _(taus, factors, codes, weights, want_grad, dtype, op):
    return taus[0].new_empty((), dtype=dtype), [torch.empty_like(t) for t in taus] if want_grad else []


@torch.library.custom_op("kfac_kernels::eigen_quadratic_forms", mutates_args=(), tags=_CUDAGRAPH_UNSAFE)
def _eigen_forms(taus: list[Tensor], U_Bs: list[Tensor], U_As: list[Tensor], Ss: list[Tensor], weights: list[float],
                 want_grad: bool, dtype: torch.dtype, op: str) -> tuple[Tensor, list[Tensor]]:
    """(Σ_l w_l Σ S_l ⊙ M_l² in ``dtype``, [G_l = 2 w_l S_l ⊙ M_l] in ``dtype`` if ``want_grad`` else []),
    M_l = U_B,lᵀ τ_l U_A,l; ``_eigen_gradients`` turns G_l into the gradient U_B,l G_l U_A,lᵀ."""
    if _backend.select(op, taus[0].device, [t.dtype for t in (*taus, *U_Bs, *U_As, *Ss)]) == "torch":
        total, Gs = reference.eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights, want_grad, dtype)
    else:
        from .triton_kernels import quadratic
        total, Gs = quadratic.eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights, want_grad)
    return total, Gs or []


@_eigen_forms.register_fake
def _(taus, U_Bs, U_As, Ss, weights, want_grad, dtype, op):
    return taus[0].new_empty((), dtype=dtype), [S.new_empty(S.shape, dtype=dtype) for S in Ss] if want_grad else []


@torch.library.custom_op("kfac_kernels::eigen_gradients", mutates_args=("grads",), tags=_CUDAGRAPH_UNSAFE)
def _eigen_gradients(Gs: list[Tensor], U_Bs: list[Tensor], U_As: list[Tensor], grads: list[Tensor], op: str) -> None:
    """grads[l] = U_B,l G_l U_A,lᵀ (d_out, d_in), in place, in grads[l]'s dtype."""
    if _backend.select(op, Gs[0].device, [t.dtype for t in (*Gs, *U_Bs, *U_As, *grads)]) == "torch":
        for out, g in zip(grads, reference.eigen_gradients(Gs, U_Bs, U_As, [t.dtype for t in grads])):
            out.copy_(g)
    else:
        from .triton_kernels import quadratic
        quadratic.eigen_gradients(Gs, U_Bs, U_As, grads)


def _save(ctx, output, taus, constants, options):
    """Saves what the backward multiplies by the output gradient (the forward's products), the op's
    constant inputs (lists of tensors) and, for second derivatives, the τ that are leaves or views of
    leaves (kept alive anyway): keeping a τ built by another op (a [W | b] concatenation) would hold a
    copy until the backward."""
    ctx.weights, _, ctx.dtype, ctx.op = options  # (weights, want_grad, dtype, op)
    ctx.sizes = [len(c) for c in constants]
    ctx.taus = [(t.shape, t.dtype) for t in taus]
    ctx.mark_non_differentiable(*output[1])
    ctx.save_for_backward(*output[1], *(t for c in constants for t in c), *(t if _of_leaf(t) else None for t in taus))


def _of_leaf(t: Tensor) -> bool:
    """A leaf, or a view of one (τ reshaped or transposed), which holds no memory of its own."""
    return t.is_leaf or (t._base is not None and t._base.is_leaf)


def _setup_forms(ctx, inputs, output):
    taus, factors, ctx.codes, *options = inputs
    _save(ctx, output, taus, [factors], options)


def _setup_eigen(ctx, inputs, output):
    taus, U_Bs, U_As, Ss, *options = inputs
    _save(ctx, output, taus, [U_Bs, U_As, Ss], options)


def _unpack(ctx):
    """(products, constant lists, τ leaves or None) saved by ``_save``."""
    saved, n = list(ctx.saved_tensors), len(ctx.taus)
    products, rest, constants = saved[:n], saved[n:], []
    for size in ctx.sizes:
        constants.append(rest[:size])
        rest = rest[size:]
    return products, constants, rest


def _second_order(ctx, taus):
    if any(t is None for t in taus):
        raise RuntimeError(f"{ctx.op}: second derivatives (create_graph=True) need every τ to be a leaf tensor "
                           "(e.g. a parameter) or a view of one; a τ computed by another op (e.g. a [W | b] "
                           "concatenation) is not kept for them")


def _forms_backward(ctx, g, _):
    products, (factors,), taus = _unpack(ctx)
    if torch.is_grad_enabled():  # create_graph=True: the gradient as a differentiable function of τ
        _second_order(ctx, taus)
        Fs = unflatten(factors, ctx.codes)
        grads = [gr * g for gr in reference.quadratic_forms(taus, Fs[:len(taus)], Fs[len(taus):], ctx.weights, True,
                                                            ctx.dtype)[1]]
    else:
        grads = torch._foreach_mul(products, g)
    return _needed(ctx, grads), [None] * len(factors), None, None, None, None, None


def _eigen_backward(ctx, g, _):
    Gs, (U_Bs, U_As, Ss), taus = _unpack(ctx)
    if torch.is_grad_enabled():
        _second_order(ctx, taus)
        Gs = reference.eigen_quadratic_forms(taus, U_Bs, U_As, Ss, ctx.weights, True, ctx.dtype)[1]
        grads = [gr * g for gr in reference.eigen_gradients(Gs, U_Bs, U_As, [dt for _, dt in ctx.taus])]
    else:
        grads = [Gs[0].new_empty(shape, dtype=dt) for shape, dt in ctx.taus]
        _eigen_gradients(Gs, U_Bs, U_As, grads, ctx.op)
        grads = torch._foreach_mul(grads, g)
    return _needed(ctx, grads), *([None] * len(c) for c in (U_Bs, U_As, Ss)), None, None, None, None


def _needed(ctx, grads):
    return [gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[0])]


_forms.register_autograd(_forms_backward, setup_context=_setup_forms)
_eigen_forms.register_autograd(_eigen_backward, setup_context=_setup_eigen)


def _weights(op: str, weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, torch.Tensor) and torch.compiler.is_compiling():
        raise TypeError(f"{op}: under torch.compile, weights must be a list of numbers (constants of the graph), "
                        "not a tensor")
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
    return _precision.compute_dtype(op, float16_in_fp32=True, **{f"tau{tag}": tau.dtype, f"B{tag}": B.dtype,
                                                           f"A{tag}": A.dtype})


def _call(op, taus, compute_dtypes, factors, weights, plain, grouped, by_reference):
    """Σ_l w_l q_l, in fp64 when every layer's ``compute_dtypes`` is, else fp32: the layers marked ``plain`` by the
    ``reference`` function ``by_reference`` under autograd, the others in one call of ``grouped`` (a torch.library
    op's front); ``factors``: lists with one entry per layer."""
    taus = list(taus)
    _validate.same_device(op, **{f"tau[{i}]": t for i, t in enumerate(taus)})
    dtype = torch.float64 if set(compute_dtypes) == {torch.float64} else torch.float32
    total = None
    for by_ref in (False, True):
        index = [i for i, p in enumerate(plain) if p == by_ref]
        if not index:
            continue
        args = [[x[i] for i in index] for x in (taus, *factors, weights)]
        if by_ref:
            part = by_reference(*args, False, dtype)[0]
        else:
            part = grouped(*args, torch.is_grad_enabled() and any(t.requires_grad for t in args[0]), dtype)
        total = part if total is None else total + part
    return total


def quadratic_forms(taus, Bs, As, weights=None) -> torch.Tensor:
    """Σ_l w_l q_l(τ_l) over many layers in one call (grouped launches).

    taus[l] (d_out_l, d_in_l), Bs[l] (d_out_l²), As[l] (d_in_l²); weights: numbers (default 1), or a 1-D
    tensor without grad in eager mode (under ``torch.compile`` a list: constants of the graph)."""
    return _quadratic_forms("quadratic_forms", taus, Bs, As, weights)


def quadratic_form(tau, B, A) -> torch.Tensor:
    """q = vec(τ)ᵀ (B ⊗ A) vec(τ) = Σ τ ⊙ (B τ A) for τ (d_out, d_in), B (d_out²), A (d_in²) symmetric."""
    return _quadratic_forms("quadratic_form", [tau], [B], [A], None)


def _quadratic_forms(op: str, taus, Bs, As, weights) -> torch.Tensor:
    n = _layers(op, taus=taus, Bs=Bs, As=As)
    cts = [_check_layer(op, i if n > 1 else None, tau, B, A) for i, (tau, B, A) in enumerate(zip(taus, Bs, As))]

    def grouped(taus, Bs, As, weights, want_grad, dtype):
        return _forms(taus, *flatten([*Bs, *As]), weights, want_grad, dtype, op)[0]
    plain = [is_diagonal(B) or is_diagonal(A) for B, A in zip(Bs, As)]
    return _call(op, taus, cts, (Bs, As), _weights(op, weights, n), plain, grouped, _seen_columns)


def _seen_columns(taus, Bs, As, weights, want_grad, dtype):
    """``reference.quadratic_forms`` over the columns where a diagonal A is not zero: τ's other columns add nothing
    (an embedding's rows of the tokens its factors never saw, most of a vocabulary). One host sync per such layer;
    under torch.compile, whose graphs take no data-dependent shapes, every column."""
    if not torch.compiler.is_compiling():
        seen = [A.nonzero().squeeze(1) if is_diagonal(A) else None for A in As]
        taus = [t if s is None else t[:, s] for t, s in zip(taus, seen)]
        As = [A if s is None else A[s] for A, s in zip(As, seen)]
    return reference.quadratic_forms(taus, Bs, As, weights, want_grad, dtype)


def eigen_quadratic_forms(taus, U_Bs, U_As, Ss, weights=None) -> torch.Tensor:
    """Σ_l w_l Σ S_l ⊙ (U_B,lᵀ τ_l U_A,l)² (EK-FAC), in one call.

    taus[l] (d_out, d_in), U_Bs[l] (d_out, r_B), U_As[l] (d_in, r_A) or None (the identity, r_A = d_in),
    Ss[l] (r_B, r_A)."""
    return _eigen_quadratic_forms("eigen_quadratic_forms", taus, U_Bs, U_As, Ss, weights)


def eigen_quadratic_form(tau, U_B, U_A, S) -> torch.Tensor:
    """q = Σ S ⊙ (U_Bᵀ τ U_A)² for τ (d_out, d_in), U_B (d_out, r_B), U_A (d_in, r_A) or None (the identity),
    S (r_B, r_A)."""
    return _eigen_quadratic_forms("eigen_quadratic_form", [tau], [U_B], [U_A], [S], None)


def _eigen_quadratic_forms(op: str, taus, U_Bs, U_As, Ss, weights) -> torch.Tensor:
    n = _layers(op, taus=taus, U_Bs=U_Bs, U_As=U_As, Ss=Ss)
    cts = []
    for i, (tau, U_B, U_A, S) in enumerate(zip(taus, U_Bs, U_As, Ss)):
        tag = "" if n == 1 else f"[{i}]"
        _validate.tensor(op, f"tau{tag}", tau, ndim=2)
        _validate.tensor(op, f"U_B{tag}", U_B, ndim=2)
        identity = U_A is None
        if identity:  # a stand-in for the checks: d_in rows, on tau's device, of its dtype
            U_A = tau.new_empty(tau.shape[1], 0)
        _validate.tensor(op, f"U_A{tag}", U_A, ndim=2)
        _validate.tensor(op, f"S{tag}", S, ndim=2)
        r_A = tau.shape[1] if identity else U_A.shape[1]
        if (U_B.shape[0], U_A.shape[0]) != tuple(tau.shape) or tuple(S.shape) != (U_B.shape[1], r_A):
            raise ValueError(f"{op}: tau{tag} {tuple(tau.shape)}, U_B{tag} {tuple(U_B.shape)}, U_A{tag} "
                             f"{None if identity else tuple(U_A.shape)} and S{tag} {tuple(S.shape)} do not fit: "
                             "need U_B (d_out, r_B), U_A (d_in, r_A) or None (r_A = d_in), S (r_B, r_A) for tau "
                             "(d_out, d_in)")
        _validate.same_device(op, **{f"tau{tag}": tau, f"U_B{tag}": U_B, f"U_A{tag}": U_A, f"S{tag}": S})
        _validate.no_grad_needed(op, **{f"U_B{tag}": U_B, f"U_A{tag}": U_A, f"S{tag}": S})
        cts.append(_precision.compute_dtype(op, float16_in_fp32=True, **{f"tau{tag}": tau.dtype, f"U_B{tag}": U_B.dtype,
                                                                   f"U_A{tag}": U_A.dtype, f"S{tag}": S.dtype}))

    def grouped(taus, U_Bs, U_As, Ss, weights, want_grad, dtype):
        return _eigen_forms(taus, U_Bs, U_As, Ss, weights, want_grad, dtype, op)[0]
    plain = [U_A is None for U_A in U_As]
    return _call(op, taus, cts, (U_Bs, U_As, Ss), _weights(op, weights, n), plain, grouped,
                 reference.eigen_quadratic_forms)
