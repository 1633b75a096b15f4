"""Every Triton kernel launches on the device of its op's inputs: Triton launches on the current CUDA
device, so each op sets it from its inputs (a model on cuda:1 while cuda:0 is current must not have its
kernels run on cuda:0). Checked by recording, at each launch, the device the op entered."""
import contextlib

import pytest
import torch
from triton.runtime.jit import KernelInterface

from tests.conftest import KERNEL_BACKENDS
from tests.test_compile import _front_cases, _triton_cases

pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="needs Triton")


@pytest.fixture
def launches(monkeypatch):
    """The list of (kernel name, device entered by ``torch.cuda.device_of`` or None) of every launch."""
    entered, recorded = [], []
    device_of, getitem = torch.cuda.device_of, KernelInterface.__getitem__

    @contextlib.contextmanager
    def recording_device_of(obj):
        with device_of(obj):
            entered.append(obj.device)
            try:
                yield
            finally:
                entered.pop()

    def launcher(kernel, grid):
        run = getitem(kernel, grid)

        def launch(*args, **kwargs):
            recorded.append((kernel.__name__, entered[-1] if entered else None))
            return run(*args, **kwargs)
        return launch

    monkeypatch.setattr(torch.cuda, "device_of", recording_device_of)
    monkeypatch.setattr(KernelInterface, "__getitem__", launcher)
    return recorded


def test_every_launch_runs_on_its_inputs_device(launches, use_backend):
    use_backend("triton")
    cases = _front_cases() | _triton_cases()
    for name, (op, args) in cases.items():
        launches.clear()
        op(*args)
        assert launches, f"{name}: no Triton kernel launched"
        device = args[0][0].device if isinstance(args[0], list) else args[0].device
        wrong = [(kernel, d) for kernel, d in launches if d != device]
        assert not wrong, f"{name}: launched outside a device guard for {device}: {wrong}"


def test_launches_take_fewer_pipeline_stages_where_the_gpu_has_less_shared_memory(monkeypatch):
    """A GPU of 99 KiB per block (sm_86/89/120) cannot hold the stages an H100 takes: the launch retries with fewer,
    remembers what fitted, and raises what fewer stages cannot fix."""
    from triton.runtime.errors import OutOfResources

    from kfac_kernels.triton_kernels.common import launch_fitting

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # no GPU here: device -1 in the memo
    calls = []

    class Kernel:  # a JIT function's launch, needing 64 KiB of shared memory per stage of a 99 KiB GPU
        def __init__(self, fails=None):
            self.fails = fails

        def __getitem__(self, grid):
            def run(*args, num_stages, **constexprs):
                calls.append((grid, args, num_stages, constexprs))
                if self.fails:
                    raise self.fails
                if num_stages * 65536 > 101376:
                    raise OutOfResources(num_stages * 65536, 101376, "shared memory")
            return run

    kernel = Kernel()
    launch_fitting(kernel, (4,), "x", 7, num_stages=3, DOT="tf32")
    assert [c[2] for c in calls] == [3, 2, 1] and calls[-1] == ((4,), ("x", 7), 1, {"DOT": "tf32"})
    launch_fitting(kernel, (2,), "y", 1, num_stages=3, DOT="tf32")
    assert [c[2] for c in calls] == [3, 2, 1, 1]  # remembered
    launch_fitting(kernel, (2,), "y", 1, num_stages=3, DOT="bf16")  # other constexprs: tried afresh
    assert [c[2] for c in calls] == [3, 2, 1, 1, 3, 2, 1]
    for error in (OutOfResources(2048, 1024, "threads"), OutOfResources(200000, 101376, "shared memory")):
        with pytest.raises(OutOfResources, match=error.name):  # fewer stages do not help, or none are left
            launch_fitting(Kernel(fails=error), (1,), num_stages=2 if error.name == "threads" else 1)

    class Tiled:  # 4 KiB of shared memory per row of its tile and stage: 32 rows or more fit no stage, 16 rows one
        def __getitem__(self, grid):
            def run(*args, num_stages, BLOCK_N):
                calls.append((grid({"BLOCK_N": BLOCK_N}), num_stages, BLOCK_N))
                if num_stages * BLOCK_N * 4096 > 101376:
                    raise OutOfResources(num_stages * BLOCK_N * 4096, 101376, "shared memory")
            return run

    calls.clear()
    tiled, grid = Tiled(), lambda meta: (-(-100 // meta["BLOCK_N"]),)  # the grid of the tiles launched
    with pytest.raises(OutOfResources, match="shared memory"):
        launch_fitting(tiled, grid, num_stages=2, smaller=({"BLOCK_N": 32},), BLOCK_N=64)
    calls.clear()
    launch_fitting(tiled, grid, num_stages=2, smaller=({"BLOCK_N": 32}, {"BLOCK_N": 16}), BLOCK_N=64)
    assert calls == [((2,), 2, 64), ((2,), 1, 64), ((4,), 2, 32), ((4,), 1, 32), ((7,), 2, 16), ((7,), 1, 16)]
    launch_fitting(tiled, grid, num_stages=2, smaller=({"BLOCK_N": 32}, {"BLOCK_N": 16}), BLOCK_N=64)
    assert calls[6:] == [((7,), 1, 16)]  # remembered
