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


def _tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_files_stay_small():
    """One concept per file: no Python file over 400 lines."""
    big = [(rel, n) for rel in _tracked("*.py") if (n := len((ROOT / rel).read_text().splitlines())) > 400]
    assert not big, f"split these by concept: {big}"


# Called by name by other libraries (megatron-core's schedules and checkpoint strategies, pickle),
# or a read-only view the tests use to observe a component.
CALLED_ELSEWHERE = {"set_input_tensor", "persistent_load", "load_sharded_metadata", "load_common",
                    "load_sharded_objects", "consumed_sequences", "active"}


def test_every_definition_is_used():
    """No dead helpers: every function, method and class of megatron_emu/ and data_tools/ is
    named again outside tests/ (code, benchmarks, scripts, docs) or listed above."""
    import ast

    texts = {rel: (ROOT / rel).read_text() for rel in _tracked("*.py", "*.sh", "*.sbatch", "*.md")}
    words: dict[str, int] = {}
    for rel, text in texts.items():
        if not rel.startswith("tests/"):
            for word in re.findall(r"\w+", text):
                words[word] = words.get(word, 0) + 1
    unused = []
    for rel, text in texts.items():
        if not rel.endswith(".py") or not rel.startswith(("megatron_emu/", "data_tools/")):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
                if not name.startswith("__") and name not in CALLED_ELSEWHERE and words.get(name, 0) < 2:
                    unused.append(f"{rel}: {name}")
    assert not unused, f"defined but never used: {unused}"


def test_package_and_config_import_without_megatron():
    code = ("import sys, megatron_emu, megatron_emu.config.io, megatron_emu.config.validate, "
            "megatron_emu.planner, megatron_emu.training.build, megatron_emu.compat, data_tools; "
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
