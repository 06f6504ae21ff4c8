"""Import and device hygiene."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_torch_cuda_only_in_device_modules():
    allowed = {"megatron_emu/utils/device.py", "megatron_emu/compat/cpu.py", "megatron_emu/compat/cuda_standin.py"}
    offenders = []
    for path in list((ROOT / "megatron_emu").rglob("*.py")) + list((ROOT / "data_tools").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if rel not in allowed and re.search(r"torch\.cuda|['\"]cuda['\"]|\.cuda\(", text):
            offenders.append(rel)
    assert not offenders, f"device-specific code outside utils/device.py: {offenders}"


def test_files_stay_small():
    big = [(p.relative_to(ROOT).as_posix(), n) for p in ROOT.rglob("*.py")
           if ".git" not in p.parts and (n := len(p.read_text().splitlines())) > 600]
    assert not big, f"split these by concept: {big}"


def test_package_and_config_import_without_megatron():
    code = ("import sys, megatron_emu, megatron_emu.config.io, megatron_emu.config.validate, "
            "megatron_emu.planner, data_tools; "
            "bad = [m for m in sys.modules if m.startswith(('megatron.core', 'transformer_engine'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_data_tools_import_no_training_or_gpu_code():
    code = ("import sys, data_tools.cli, data_tools.preprocess, data_tools.inspect, data_tools.samples, "
            "data_tools.tokenizer, data_tools.sources.img2dataset, data_tools.sources.records; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformer_engine') "
            "or m.startswith(('megatron.core', 'nvidia.dali', 'megatron_emu.model', 'megatron_emu.training'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
