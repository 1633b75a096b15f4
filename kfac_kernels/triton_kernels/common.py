"""Pieces shared by the Triton kernels: how tiles are multiplied, and tile sizes."""
import torch
import triton
import triton.language as tl

from .. import _backend, _precision

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.int8: tl.int8}


def dot_mode(dtype: torch.dtype) -> str:
    """``_precision.dot_mode``, except that under the interpreter bf16 tiles are multiplied as
    bf16-rounded fp32 ('bf16_rounded'): Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly.
    bf16 products are exact in fp32, so this is the same arithmetic as a bf16 MMA."""
    mode = _precision.dot_mode(dtype)
    return "bf16_rounded" if mode == "bf16" and _backend.interpreting() else mode


@triton.jit
def dot_acc(x, y, acc, DOT: tl.constexpr):
    """acc + x @ y, operands multiplied as ``dot_mode`` says; fp32 accumulation."""
    if DOT == "bf16":
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
    elif DOT == "fp16":
        return tl.dot(x.to(tl.float16), y.to(tl.float16), acc)
    elif DOT == "bf16_rounded":
        return tl.dot(x.to(tl.bfloat16).to(tl.float32), y.to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision=DOT)
