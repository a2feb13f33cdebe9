"""Build of lorenza_kernels._C, a torch-free pybind11 extension.

- The C++/OpenMP CPU kernels (csrc/cpu/*.cpp) are always built.
- The CUDA kernels (csrc/cuda/*.cu, compiled by nvcc, runtime headers only) and their pybind11
  launchers (csrc/cuda/*.cpp) are added when the installed torch is a CUDA build and a toolkit is
  found, linked to the static CUDA runtime only. Nothing here probes hardware or the network.

Environment:
  LORENZA_KERNELS_CUDA=1|0   force or skip the CUDA part (1 fails if no nvcc is found)
  LORENZA_KERNELS_NO_EXT=1   build no extension at all (every op then runs the reference)
  LORENZA_KERNELS_CUDA_ARCH  nvcc -gencode list, e.g. "80;90" (default "80;90;90+PTX")
  MAX_JOBS                   parallel nvcc jobs (default from cores and memory)
  CUDA_HOME / CUDA_PATH      the toolkit (default: nvcc on PATH, then /usr/local/cuda)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        sys.exit(f"setup.py: {name}={value!r} is not one of 1/0/true/false/yes/no/on/off")
    return None


def _cuda_home() -> str | None:
    """The first toolkit with both nvcc and the runtime headers: CUDA_HOME, CUDA_PATH, the nvcc on
    PATH (which may be a wrapper script outside its toolkit), then /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if (
            home
            and os.path.exists(os.path.join(home, "bin", "nvcc"))
            and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return home
    return None


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def _want_cuda(cuda_home: str | None) -> bool:
    forced = _flag("LORENZA_KERNELS_CUDA")
    if forced is True and cuda_home is None:
        sys.exit("setup.py: LORENZA_KERNELS_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if forced is not None:
        return forced
    return cuda_home is not None and _torch_has_cuda()


def _gencode_flags() -> list[str]:
    flags = []
    for arch in os.environ.get("LORENZA_KERNELS_CUDA_ARCH", "80;90;90+PTX").replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if not arch:
            continue
        if arch.endswith("+PTX"):
            arch = arch[:-4]
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
        else:
            flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _max_jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    return max(1, min(os.cpu_count() or 1, int(mem_gb // 4)))


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc into objects, then links them in."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = self._nvcc_compile(cu_sources) + list(ext.extra_objects or [])
        super().build_extension(ext)

    def _nvcc_compile(self, sources: list[str]) -> list[str]:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        common = ["-O3", "-std=c++17", "--use_fast_math", "-Xcompiler", "-fPIC", "-I" + os.path.join(ROOT, "csrc")]
        common += _gencode_flags()

        def one(src: str) -> str:
            obj = os.path.join(self.build_temp, "cuda", os.path.basename(src) + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            cmd = [nvcc, "-c", src, "-o", obj, *common]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            return obj

        with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
            return list(pool.map(one, sources))


def _extensions():
    if _flag("LORENZA_KERNELS_NO_EXT"):
        return []
    from pybind11.setup_helpers import Pybind11Extension

    def rel(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    macros, libs, lib_dirs, link_args = [], [], [], []
    if WITH_CUDA:
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        macros.append(("LORENZA_WITH_CUDA", "1"))
        lib_dirs = [d for d in (os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib")) if os.path.isdir(d)]
        libs = ["cudart_static", "dl", "rt", "pthread"]
    ext = Pybind11Extension(
        "lorenza_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + ([os.path.join(CUDA_HOME, "include")] if WITH_CUDA else []),
        define_macros=macros,
        libraries=libs,
        library_dirs=lib_dirs,
        # fp-contract=off: no fused multiply-adds, so every ISA path gives the same bits.
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"],
        depends=rel("csrc/*/*.h") + rel("csrc/*/*.cuh"),
        extra_link_args=["-fopenmp", *link_args],
        cxx_std=17,
    )
    return [ext]


CUDA_HOME = _cuda_home()
WITH_CUDA = _want_cuda(CUDA_HOME)
if WITH_CUDA:
    print(f"lorenza_kernels: building the CUDA kernels with {CUDA_HOME}", flush=True)

setup(
    packages=find_packages(include=["lorenza_kernels", "lorenza_kernels.*"])
    + find_packages("python_api", include=["lorenza", "lorenza.*"]),
    package_dir={"lorenza": "python_api/lorenza"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
