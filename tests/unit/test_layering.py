"""Layers point one way. Every import of a megatron_emu module (at the top of a file or inside a
function) is checked against what its layer may import:

    contracts (the batch, vocabulary, image layout, parameter namespace, checkpoint format)
        imports nothing of ours outside contracts; everything may import it
    config, utils, ops, compat, parallel (process groups)
    data <- data_tools                 model (never data or training)
    checkpoint (conversion, model-state loading), inference
    training (the loop; training/build.py is the composition root)
    cli (entry points)

Nothing imports ``training`` but the CLI and training itself (its composition root included),
data and model never import each other, and no module imports another module's private
(``_``-prefixed) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ALLOWED = {
    "contracts": {"contracts"},  # nothing of ours outside contracts
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
    "checkpoint": {"checkpoint", "contracts", "config", "model", "parallel", "utils"},
    "inference": {"inference", "checkpoint", "contracts", "config", "data", "model", "parallel", "utils"},
    "cli": {"cli", "training", "checkpoint", "inference", "config", "contracts", "data", "model", "parallel",
            "planner", "compat", "utils"},
    "package": {"cli"},  # megatron_emu/train.py, launch.py: `python -m` aliases of the CLI
}


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


def _private_imports(path: Path) -> list[str]:
    """``from <our module> import _name`` (a private name of another module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in
                                                 ("megatron_emu", "data_tools")):
            out += [f"{node.module}.{a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_layers_point_one_way():
    wrong = []
    for rel, path in _files():
        layer = _layer(rel)
        for module in _imports(path):
            target = _target_layer(module)
            if target is None or target in ALLOWED[layer]:
                continue
            wrong.append(f"{rel} ({layer}) imports {module} ({target})")
    assert not wrong, "\n".join(wrong)


def test_contracts_import_nothing_of_ours():
    users = {f"{rel} imports {m}" for rel, path in _files() if _layer(rel) == "contracts"
             for m in _imports(path) if _target_layer(m) != "contracts"}
    assert not users, users


def test_data_and_model_import_only_contracts_and_the_base():
    for layer in ("data", "model"):
        assert not ALLOWED[layer] & {"data", "model", "training", "checkpoint", "inference", "cli"} - {layer}


def test_only_cli_and_training_import_training():
    users = {rel for rel, path in _files() for m in _imports(path)
             if m.startswith("megatron_emu.training") and _layer(rel) not in ("cli", "training")}
    assert not users, users


def test_no_private_names_imported_across_modules():
    wrong = [f"{rel}: {name}" for rel, path in _files() for name in _private_imports(path)]
    assert not wrong, "\n".join(wrong)
