"""Loader of the CUDA C++ kernels in ``csrc/``: the prebuilt ``kfac_kernels._C`` if installed with
``KFAC_KERNELS_PREBUILD=1``, else a JIT build with ninja (cached by torch) on first use.
Nothing happens at import time.
"""
from pathlib import Path

import torch


def _source_dir() -> Path | None:
    """``csrc/`` of an installed package (setup.py copies it there) or of the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


_OUTCOME = {}  # "module" or "error": the first load's, kept for the process


def load():
    """The compiled extension module (functions: ``covariance_update``). A failed build raises its error again on
    every later call without building again (each try would cost a compile)."""
    if not _OUTCOME:
        try:
            _OUTCOME["module"] = _build()
        except Exception as e:  # noqa: BLE001 - kept, and raised to every caller
            _OUTCOME["error"] = e
    if "error" in _OUTCOME:
        raise _OUTCOME["error"]
    return _OUTCOME["module"]


def _build():
    if not torch.cuda.is_available():
        raise RuntimeError("kfac_kernels CUDA backend: CUDA is not available (torch.cuda.is_available() is False)")
    try:
        from . import _C

        return _C
    except ImportError:
        pass
    src = _source_dir()
    if src is None:
        raise RuntimeError("kfac_kernels CUDA backend: no prebuilt kfac_kernels._C and no csrc/ sources found "
                           "next to the package or in the source tree")
    from torch.utils.cpp_extension import load as jit_load

    sources = sorted(str(p) for p in (*src.glob("*.cpp"), *src.glob("*.cu")))
    return jit_load(name="kfac_kernels_cuda", sources=sources, extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)  # as setup.py's prebuild
