"""Layers point one way. Every import of a megatron_emu module (at the top of a file or inside a
function) is checked against what its layer may import:

    contracts (the batch, vocabulary, image layout, parameter namespace) <- everything
    config, utils, ops, compat, parallel (process groups)
    data <- data_tools                 model (never data or training)
    training (the composition root: training/build.py), checkpoint, inference
    cli (entry points)

Nothing imports ``training`` but the CLI and training itself, and data and model never import
each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ALLOWED = {
    "contracts": {"contracts"},
    "config": {"config", "contracts"},
    "utils": {"utils"},
    "ops": {"ops", "utils"},
    "compat": {"compat", "utils"},
    "parallel": {"parallel", "utils", "compat"},
    "data": {"data", "contracts", "utils"},
    "data_tools": {"data_tools", "data", "contracts"},
    "model": {"model", "contracts", "config", "parallel", "ops", "utils"},
    "planner": {"planner", "config", "contracts", "model", "utils"},
    "training": {"training", "contracts", "config", "data", "model", "parallel", "planner", "compat",
                 "checkpoint", "ops", "utils"},
    "checkpoint": {"checkpoint", "contracts", "config", "data", "model", "parallel", "utils"},
    "inference": {"inference", "checkpoint", "contracts", "config", "data", "model", "parallel", "utils"},
    "cli": {"cli", "training", "checkpoint", "inference", "config", "contracts", "data", "model", "parallel",
            "planner", "compat", "utils"},
    "package": {"cli"},  # megatron_emu/train.py, launch.py: `python -m` aliases of the CLI
}

# Imports across the allowed direction that stay until a named follow-up, each with its reason.
# file -> the modules it may still import although its layer may not.
EXEMPT = {
    # Loading a checkpoint's metadata and model state lives in training/checkpointing.py until
    # the checkpoint format moves into contracts (its paths already moved to checkpoint/paths.py).
    "megatron_emu/inference/generate.py": {"megatron_emu.training.checkpointing"},
}
# The vocabulary moved to contracts/vocab.py; the old path re-exports it for these files only
# (being changed by the conversion work at the same time), until the same follow-up.
OLD_VOCAB = "megatron_emu.data.special_tokens"
OLD_VOCAB_USERS = {"megatron_emu/checkpoint/hf_config.py", "megatron_emu/inference/generate.py"}


def _layer(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[0] == "data_tools":
        return "data_tools"
    if len(parts) == 2:  # a module directly in megatron_emu/
        return {"planner": "planner", "__init__": "package"}.get(parts[1], "package")
    return parts[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in out if m.split(".")[0] in ("megatron_emu", "data_tools")}


def _target_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "data_tools":
        return "data_tools"
    if len(parts) == 1:
        return None  # the package itself
    if parts[1] in ALLOWED or parts[1] == "planner":
        return parts[1]
    return "cli" if parts[1] in ("train", "launch") else None  # names imported from the package


def _files():
    for top in ("megatron_emu", "data_tools"):
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path


def test_layers_point_one_way():
    wrong = []
    for rel, path in _files():
        layer = _layer(rel)
        for module in _imports(path):
            target = _target_layer(module)
            if target is None or target in ALLOWED[layer]:
                continue
            if any(module == e or module.startswith(e + ".") for e in EXEMPT.get(rel, ())):
                continue
            wrong.append(f"{rel} ({layer}) imports {module} ({target})")
    assert not wrong, "\n".join(wrong)


def test_only_cli_and_training_import_training():
    users = {rel for rel, path in _files() for m in _imports(path)
             if m.startswith("megatron_emu.training") and _layer(rel) not in ("cli", "training")}
    assert users == set(EXEMPT), users


def test_old_vocabulary_path_is_only_a_transitional_re_export():
    users = {rel for rel, path in _files() for m in _imports(path) if m == OLD_VOCAB or m.startswith(OLD_VOCAB + ".")}
    assert users <= OLD_VOCAB_USERS, users - OLD_VOCAB_USERS


def test_exemptions_are_still_needed():
    """An exemption that no longer matches an import must be deleted from this file."""
    for rel, modules in EXEMPT.items():
        imported = _imports(ROOT / rel)
        for e in modules:
            assert any(m == e or m.startswith(e + ".") for m in imported), f"{rel}: {e} is no longer imported"
