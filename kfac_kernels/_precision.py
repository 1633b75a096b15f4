"""Matrix-multiply precision of the kernels.

Operands are multiplied in the narrowest input dtype: bfloat16 or float16 if any operand has it,
else float32, whose mode follows ``torch.get_float32_matmul_precision()``:
'highest' -> IEEE fp32, 'high' -> tf32, 'medium' -> bf16. Accumulation is always fp32.

One exception, for the quadratic forms (``float16_in_fp32=True``): float16 operands are multiplied as
float32, their products kept in float32. Factors are second moments (A ~ x²): their entries, and the
products τ A, (X U)·λ, S ⊙ M of the forms even more, overflow float16's range (65504). A layer of
float16 operands alone is multiplied as tf32, which holds every float16 value exactly (float16's
precision on the tensor cores, with float32's range); one that meets float32 operands, in the matmul
precision's mode above. bfloat16 has float32's range, so bfloat16 τ, with bfloat16 or float32
factors, stays bfloat16.

The PyTorch reference backends run with autocast disabled (``no_autocast``): they choose their
dtypes themselves, so an enclosing ``torch.autocast`` does not turn their fp32 accumulation into
bf16/fp16 products.
"""
import contextlib

import torch

_FP32_MODES = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def compute_dtype(op: str, *, float16_in_fp32: bool = False, **named: torch.dtype) -> torch.dtype:
    """The dtype the operands named in ``named`` are multiplied in (see module docstring); with
    ``float16_in_fp32``, float16 operands give float32."""
    kinds = set(named.values())
    if torch.bfloat16 in kinds and torch.float16 in kinds:
        listing = ", ".join(f"{k}={v}" for k, v in named.items())
        raise TypeError(f"{op}: cannot mix bfloat16 and float16 operands ({listing})")
    if float16_in_fp32 and torch.float16 in kinds:
        return torch.float32
    for half in (torch.bfloat16, torch.float16):
        if half in kinds:
            return half
    return torch.float64 if kinds == {torch.float64} else torch.float32


def no_autocast(device: torch.device):
    """A context disabling autocast for ``device``'s type (a null context where autocast does not exist). CPU and
    CUDA have it, and are not asked: torch 2.11's ``torch.compile`` cannot trace ``is_autocast_available``."""
    if device.type in ("cpu", "cuda") or torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def dot_mode(dtype: torch.dtype) -> str:
    """How a Triton kernel multiplies tiles of ``dtype``: 'ieee', 'tf32', 'bf16' or 'fp16'."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return _FP32_MODES[torch.get_float32_matmul_precision()]
