"""Build sdxl_kernels._C: CPU kernels always; CUDA kernels when this torch was
built with CUDA and nvcc is found (then WITH_CUDA is defined).

Env: SDXL_KERNELS_PORTABLE=1 drops -march=native (for wheels that travel).
     TORCH_CUDA_ARCH_LIST picks GPU archs, e.g. "8.0;9.0".
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension


def cuda_available() -> bool:
    home = cpp_extension.CUDA_HOME
    return bool(torch.version.cuda and home and os.path.exists(os.path.join(home, "bin", "nvcc")))


with_cuda = cuda_available()
portable = os.environ.get("SDXL_KERNELS_PORTABLE", "0") == "1"
sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
cxx_flags = ["-O3", "-fopenmp", *([] if portable else ["-march=native"])]
extra_compile_args = {"cxx": cxx_flags}
Extension = cpp_extension.CppExtension
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    cxx_flags.append("-DWITH_CUDA")
    extra_compile_args["nvcc"] = ["-O3", "-DWITH_CUDA", "-lineinfo"]
    Extension = cpp_extension.CUDAExtension

setup(
    packages=find_packages(include=["sdxl_kernels*", "sdxl_model*"]),
    ext_modules=[
        Extension(
            "sdxl_kernels._C",
            sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
