"""Backward passes that autograd cannot differentiate again (the Triton kernels'): a second derivative
through one raises a clear error instead of silently dropping terms. ``output`` casts what a forward returns.
"""
import functools

import torch
from torch._C import _functions


def output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` as an ``autograd.Function.forward`` returns it: ``t`` itself when it has that dtype
    (torch 2.11's ``torch.compile`` drops the gradients of an output returned through a no-op ``.to``)."""
    return t if t.dtype == dtype else t.to(dtype)


def once_differentiable(op: str):
    """Decorator for an ``autograd.Function.backward`` computed outside autograd (kernels, no graph).

    Like ``torch.autograd.function.once_differentiable``, it runs the backward under ``no_grad`` and,
    under ``create_graph``, makes its gradients raise when differentiated. Unlike it, that also happens
    when the output gradients are constants but a saved tensor requires grad (``dual_linear``'s
    gradients depend on its saved inputs), and when the second derivative is taken with
    ``torch.autograd.grad(..., inputs)``: PyTorch's version gives silently wrong results there."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not anchors:
                return outputs  # nothing to differentiate: the gradients are constants
            # The error node's edges lead to what the gradients depend on (PyTorch's version points them
            # at fresh leaves, which torch.autograd.grad(..., inputs) prunes: no error, a wrong result).
            err_fn = _functions.DelayedError(
                f"{op}: its Triton backward cannot be differentiated again (no second derivatives); "
                f"run it with KFAC_KERNELS_BACKEND=torch for higher-order gradients".encode(),
                len(outputs) + len(anchors))
            return tuple(err_fn(*(None if t is None else t.detach() for t in outputs), *anchors)[:len(outputs)])

        return wrapper

    return decorate
