"""Build fastattn_icl and its compiled extension ``fastattn_icl._C``.

The C++ ops in ``csrc/`` are always built (CPU kernels). CUDA kernels in ``csrc/cuda/`` are added
when a CUDA toolkit and a CUDA build of torch are both present; set ``FASTATTN_ICL_NO_CUDA=1`` to
skip them. The CUDA code is compiled for ``TORCH_CUDA_ARCH_LIST`` (default: sm_80 and sm_90, and the
visible GPUs' archs). Build against the installed torch with ``pip install --no-build-isolation .``.
The Triton kernels in ``triton_kernels/`` are installed as ``fastattn_icl._triton``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

# sm_80 (A100) and sm_90 (H100/H200) cubins, plus sm_90 PTX that the driver can JIT for newer GPUs. Used
# when TORCH_CUDA_ARCH_LIST is unset: torch's build helper otherwise asks the visible GPU for its arch and
# fails with an IndexError on a build machine that has nvcc but no GPU.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the default list plus the arch of every visible GPU."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    archs = DEFAULT_CUDA_ARCHS.split(";")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            if f"{major}.{minor}" not in {a.removesuffix("+PTX") for a in archs}:
                archs.append(f"{major}.{minor}")
    return ";".join(archs)


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
    # -ffp-contract=off: no fused multiply-add where the source has a product and a sum (clang contracts them by
    # default, and so does GCC outside ISO mode); csrc/deep_thinking.cpp must round both, like the eager oracle.
    # -g0: no debug information (Python's own CFLAGS, which setuptools passes first, carry -g): with it every file
    # also writes the debug information of torch's headers, which more than doubled the build (28 s -> 13 s for
    # csrc/cpu_features.cpp, and the build runs twice in CI)
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off"]
    # at::parallel_for is a header template that splits work with `#pragma omp parallel` only when the including file is
    # compiled with OpenMP; without -fopenmp every CPU kernel runs on one thread. Linux torch ships its libgomp.so.1,
    # which the extension then shares (same soname, loaded first). Elsewhere (macOS clang: no plain -fopenmp) the
    # kernels stay single-threaded.
    link_flags = []
    if sys.platform.startswith("linux") and __import__("torch").backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h")):
            raise RuntimeError(
                f"fastattn_icl: CUDA_HOME={cpp_extension.CUDA_HOME} holds no CUDA toolkit (no include/cuda_runtime.h; "
                "torch guesses it from the nvcc on PATH, which may be a wrapper script): set CUDA_HOME to the "
                "toolkit (e.g. /usr/local/cuda), or FASTATTN_ICL_NO_CUDA=1 to build the CPU ops only"
            )
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
        return cpp_extension.CUDAExtension(
            "fastattn_icl._C",
            sources + cuda_sources,
            define_macros=[("FASTATTN_ICL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        "fastattn_icl._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


# triton_kernels/ and its subpackages (attention/) are installed under fastattn_icl._triton; package_dir's entry for
# the parent maps the subpackages' folders too, but each must be listed
triton_packages = ["fastattn_icl._triton"] + [f"fastattn_icl._triton.{sub}" for sub in find_packages("triton_kernels")]
packages = list(dict.fromkeys(find_packages(include=["fastattn_icl", "fastattn_icl.*"]) + triton_packages))

setup(
    packages=packages,
    package_dir={"fastattn_icl._triton": "triton_kernels"},
    package_data={"fastattn_icl.lab": ["data/*.jsonl"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
