"""Pieces shared by the Triton kernels: how tiles are multiplied, which output tile a program owns, and on
which GPU a launch runs."""
import functools

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


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets (int64) of this program's (BLOCK_M, BLOCK_N) tile of an (M, N) output,
    programs ordered in groups of GROUP_M tile rows for L2 reuse."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_m
    pid_n = (pid % (GROUP_M * grid_n)) // group_m
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn


def on_input_device(launcher):
    """``launcher`` run with the current CUDA device set to that of its first argument (a tensor, or a list
    whose first item is one). Triton launches on the current device and stream, so without this a model on
    ``cuda:1`` would have its kernels run on ``cuda:0``, reading memory of another GPU."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        with torch.cuda.device_of(first[0] if isinstance(first, (list, tuple)) else first):
            return launcher(first, *args, **kwargs)

    return launch


_FITTED: dict = {}  # (kernel, device, num_stages, constexprs) -> (stages, constexprs) that fit its GPU


def launch_fitting(kernel, grid, *args, num_stages: int, smaller: tuple[dict, ...] = (), **constexprs) -> None:
    """``kernel[grid](*args, num_stages=s, **constexprs)`` with the most software-pipelining stages s ≤
    ``num_stages`` whose shared memory the GPU has: an H100 (227 KiB per block) or A100 takes them all, a GPU of
    99 KiB (sm_86/89/120: A10G, L4, L40S, RTX) or 64 KiB (T4) fewer. Where one stage does not fit either, the
    constexprs of each dict of ``smaller`` in turn (smaller tiles) replace theirs and the stages are tried again;
    ``grid`` is then a callable of the launch's arguments by name, as Triton's. What fits is remembered per kernel,
    device and constexprs."""
    device = -1 if _backend.interpreting() else triton.runtime.driver.active.get_current_device()
    key = (kernel, device, num_stages, tuple(constexprs.items()))  # < 1 µs: launches are on the hot path
    if key in _FITTED:
        stages, fitted = _FITTED[key]
        kernel[grid](*args, num_stages=stages, **fitted)
        return
    for tiles in (constexprs, *({**constexprs, **fewer} for fewer in smaller)):
        for stages in range(num_stages, 0, -1):
            try:
                kernel[grid](*args, num_stages=stages, **tiles)
            except triton.runtime.errors.OutOfResources as e:
                if "shared memory" not in str(e):
                    raise
                error = e
                continue
            _FITTED[key] = stages, tiles
            return
    raise error


def or_empty(like: torch.Tensor, *tensors) -> tuple[torch.Tensor, ...]:
    """``tensors`` with each None replaced by an empty tensor like ``like``: the outputs of an op that a
    ``torch.library`` op can return (it cannot return None)."""
    return tuple(like.new_empty(0) if t is None else t for t in tensors)


def layout(t: torch.Tensor | None) -> int:
    """LAYOUT of a 2-D view for the kernel: 1 if stride 1 = 1 and stride 0, the address and the extent
    of dim 1 are multiples of 16 elements; 2 the same with the dims swapped; 0 any strides. Knowing
    the unit stride and the alignment lets the compiler issue 16-byte asynchronous copies."""
    if t is None:
        return 0
    (n0, n1), (s0, s1) = t.shape, t.stride()
    aligned = t.data_ptr() % (16 * t.element_size()) == 0
    if s1 == 1 and s0 % 16 == 0 and n1 % 16 == 0 and aligned:
        return 1
    if s0 == 1 and s1 % 16 == 0 and n0 % 16 == 0 and aligned:
        return 2
    return 0
