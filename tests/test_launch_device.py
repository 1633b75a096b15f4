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
