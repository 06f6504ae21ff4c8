"""The CUDA kernel compiles with this machine's nvcc against torch's headers (compile only: no
GPU needed), so a CUDA syntax or type error fails CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_sources_compile():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_cuda_compile.py")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "l2_loss_cuda.cu: ok" in proc.stdout
