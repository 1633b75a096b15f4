"""Matrix-multiply precision of the kernels.

Operands are multiplied in the narrowest input dtype: bfloat16 or float16 if any operand has it,
else float32, whose mode follows ``torch.get_float32_matmul_precision()``:
'highest' -> IEEE fp32, 'high' -> tf32, 'medium' -> bf16. Accumulation is always fp32.
"""
import torch

_FP32_MODES = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def compute_dtype(op: str, **named: torch.dtype) -> torch.dtype:
    """The dtype the operands named in ``named`` are multiplied in (see module docstring)."""
    kinds = set(named.values())
    if torch.bfloat16 in kinds and torch.float16 in kinds:
        listing = ", ".join(f"{k}={v}" for k, v in named.items())
        raise TypeError(f"{op}: cannot mix bfloat16 and float16 operands ({listing})")
    for half in (torch.bfloat16, torch.float16):
        if half in kinds:
            return half
    return torch.float64 if kinds == {torch.float64} else torch.float32


def dot_mode(dtype: torch.dtype) -> str:
    """How a Triton kernel multiplies tiles of ``dtype``: 'ieee', 'tf32', 'bf16' or 'fp16'."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return _FP32_MODES[torch.get_float32_matmul_precision()]
