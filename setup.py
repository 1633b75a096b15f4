"""Build script: pure Python by default.

The CUDA C++ kernels in ``csrc/`` are shipped inside the package and JIT-built with ninja
(``torch.utils.cpp_extension.load``) the first time they are used on a CUDA machine.
``KFAC_KERNELS_PREBUILD=1 pip install --no-build-isolation .`` compiles them at install time instead.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCudaSources(build_py):
    """Copy ``csrc/`` into the installed package, where the JIT loader finds it."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "kfac_kernels", "csrc")
        os.makedirs(dest, exist_ok=True)
        for src in glob.glob("csrc/*"):
            shutil.copy(src, dest)


cmdclass = {"build_py": BuildPyWithCudaSources}
ext_modules = []
if os.environ.get("KFAC_KERNELS_PREBUILD") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            "kfac_kernels._C",
            sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # as cuda_ext.py's JIT build
        )
    ]
    cmdclass["build_ext"] = BuildExtension

setup(cmdclass=cmdclass, ext_modules=ext_modules)
