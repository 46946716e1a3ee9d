"""Build fastattn_icl and its compiled extension ``fastattn_icl._C``.

The C++ ops in ``csrc/`` are always built (CPU kernels). CUDA kernels in ``csrc/cuda/`` are added
when a CUDA toolkit and a CUDA build of torch are both present; set ``FASTATTN_ICL_NO_CUDA=1`` to
skip them. Build against the installed torch with ``pip install --no-build-isolation .``.
The Triton kernels in ``triton_kernels/`` are installed as ``fastattn_icl._triton``.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        bool(cuda_sources)
        and os.environ.get("FASTATTN_ICL_NO_CUDA", "0") != "1"
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    # No -std flag: torch's build helper adds the standard its own headers need (C++17 on older torch,
    # C++20 on recent releases, whose headers compile as C++17 only by compiler leniency).
    cxx_flags = ["-O3"]
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "fastattn_icl._C",
            sources + cuda_sources,
            define_macros=[("FASTATTN_ICL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        )
    return cpp_extension.CppExtension("fastattn_icl._C", sources, extra_compile_args={"cxx": cxx_flags})


packages = find_packages(include=["fastattn_icl", "fastattn_icl.*"]) + ["fastattn_icl._triton"]

setup(
    packages=packages,
    package_dir={"fastattn_icl._triton": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
