"""Which implementation runs an op: the PyTorch reference, Triton, or the CUDA C++ extension.

Auto: Triton for CUDA tensors of 16/32-bit floats when Triton is installed, PyTorch otherwise.
``KFAC_KERNELS_BACKEND=torch|triton|cuda`` forces one. ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` (the interpreter the tests use). ``cuda`` applies to the ops that have a
CUDA C++ kernel (``covariance_update_``); the others run their Triton kernel under it.
Nothing here imports Triton or touches CUDA.
"""
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_TRITON = importlib.util.find_spec("triton") is not None  # once, at import (torch.compile cannot trace find_spec)


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested() -> str | None:
    """The backend forced by ``KFAC_KERNELS_BACKEND``, or None for automatic choice."""
    name = os.environ.get("KFAC_KERNELS_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"KFAC_KERNELS_BACKEND={name!r}: expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


def select(op: str, device: torch.device, dtypes, *, has_cuda_kernel: bool = False) -> str:
    """Backend for ``op`` on tensors of ``device`` whose floating dtypes are ``dtypes``."""
    forced = requested()
    kernel_dtypes = all(d in KERNEL_DTYPES for d in dtypes)
    if forced is None:
        if device.type == "cuda" and kernel_dtypes and triton_available():
            return "triton"
        return "torch"
    if forced == "torch":
        return "torch"
    if not kernel_dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: backend {forced!r} takes float16/bfloat16/float32 tensors, got {names}")
    if forced == "cuda" and has_cuda_kernel:
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got device {device}")
        return "cuda"
    if not triton_available():
        raise ValueError(f"{op}: backend {forced!r} needs Triton, which is not installed (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got device {device}")
    return "triton"
