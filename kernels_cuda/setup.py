"""Build the optional ``qtool_cuda`` extension (CUDA kernels for ``torch.ops.qtool.*``).

    cd kernels_cuda && pip install --no-build-isolation -e .      # or: make kernels

Environment:
  QTOOL_SKIP_CUDA=1        build nothing (an empty distribution) and exit cleanly
  TORCH_CUDA_ARCH_LIST     target GPUs, default "8.0;9.0a" (A100 and H100 / H200)
  MAX_JOBS                 parallel nvcc jobs (torch's ninja builder)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
NAME = "qtool-cuda"
VERSION = "0.1.0"


def _skip(reason: str) -> None:
    print(
        f"qtool_cuda: {reason}; building nothing (the pure-PyTorch reference ops stay in use)",
        file=sys.stderr,
    )
    setup(name=NAME, version=VERSION, py_modules=[], ext_modules=[])


def _sources() -> list[str]:
    found = sorted(HERE.glob("csrc/**/*.cu")) + [HERE / "csrc" / "bindings.cpp"]
    return [str(p.relative_to(HERE)) for p in found]


def main() -> None:
    if os.environ.get("QTOOL_SKIP_CUDA", "0") not in ("", "0"):
        _skip("QTOOL_SKIP_CUDA is set")
        return
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise SystemExit(
            f"qtool_cuda: torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
            "(make setup TORCH_SPEC=torch) or set QTOOL_SKIP_CUDA=1 to skip the extension"
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", f"-I{HERE / 'csrc'}"]
    ext = CUDAExtension(
        name="qtool_cuda",
        sources=_sources(),
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
    )
    setup(
        name=NAME,
        version=VERSION,
        description="CUDA kernels for qtool's int4 matmul, W4A4 and 4-bit KV-cache attention ops",
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension},
        py_modules=[],
    )


main()
