"""Argument checks shared by the ops: errors name the argument and its shape, dtype or device."""
import dataclasses

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return type(x).__name__


def tensor(op: str, name: str, x, *, ndim: int | None = None, dtypes=FLOATS) -> torch.Tensor:
    """``x`` itself, after checking it is a tensor of one of ``dtypes`` with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {describe(x)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def same_device(op: str, **named) -> torch.device:
    """The one device of the tensors in ``named`` (None values are skipped)."""
    devices = {name: x.device for name, x in named.items() if x is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def square(op: str, name: str, x: torch.Tensor, size: int | None = None) -> int:
    """Side length of the square matrix ``x``; checks it equals ``size`` when given."""
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: {name} must be a square matrix, got shape {tuple(x.shape)}")
    if size is not None and x.shape[0] != size:
        raise ValueError(f"{op}: {name} of shape {tuple(x.shape)} does not match size {size}")
    return x.shape[0]


def accumulator(op: str, name: str, t: torch.Tensor) -> None:
    """An in-place accumulator of an op outside autograd: refuse one that requires grad (its update would carry no
    history, and a leaf's in-place update is an autograd error)."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad, but it is updated in place outside autograd (its inputs are "
                         f"read as constants); pass a {name} that does not require grad")


def no_grad_needed(op: str, **named) -> None:
    """Factors are constants of the ops: refuse ones (dense, or a compressed factor's tensors) that ask for a
    gradient."""
    if not torch.is_grad_enabled():
        return
    for name, x in named.items():
        fields = [getattr(x, f.name) for f in dataclasses.fields(x)] if dataclasses.is_dataclass(x) else []
        tensors = [x] if isinstance(x, torch.Tensor) else [v for v in fields if isinstance(v, torch.Tensor)]
        if any(t.requires_grad for t in tensors):
            raise ValueError(f"{op}: {name} requires grad, but gradients flow only to tau; pass {name}.detach()")


def constant_primal(op: str, **named) -> None:
    """A dual op's primal point is a constant: refuse tensors of it that ask for a gradient."""
    for name, x in named.items():
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but the primal point is a constant; gradients flow "
                             f"to the tangents only (pass {name}.detach())")
