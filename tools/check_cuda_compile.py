"""Compile-check the CUDA sources of csrc/ with the machine's nvcc, without a GPU or a CUDA
build of torch: ``nvcc -c`` against torch's headers, warnings as errors, object discarded.

    python tools/check_cuda_compile.py [--arch 90]

Exit 0 when every ``.cu`` compiles (or, with a message, when there is no nvcc), 1 otherwise.
CPU wheels lack ``c10/cuda/impl/cuda_cmake_macros.h``; ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE``
stands in for it (it only matters for Windows DLL exports).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nvcc_command(source: Path, out: Path, arch: str) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    python_include = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    return ["nvcc", "-c", str(source), "-o", str(out), "-std=c++20", "-O2",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-DTORCH_EXTENSION_NAME=_C_cuda",
            "-Werror", "all-warnings", "--expt-relaxed-constexpr", *includes, f"-I{python_include}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90", help="SM architecture (default 90: H100)")
    args = p.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("check_cuda_compile: no nvcc on PATH; skipping")
        return 0
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            t0 = time.perf_counter()
            proc = subprocess.run(nvcc_command(src, Path(tmp) / (src.stem + ".o"), args.arch),
                                  capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else "FAILED"
            print(f"{src.relative_to(ROOT)}: {status} ({time.perf_counter() - t0:.0f} s)")
            if proc.returncode:
                failed += 1
                print(proc.stdout + proc.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
