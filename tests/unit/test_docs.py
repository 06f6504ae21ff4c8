"""The docs name only files that exist: every repository path (``megatron_emu/model/emu2.py``,
``tests/unit/``) and every file name (``schema.py``) that README.md and docs/*.md mention, outside
command examples, is in the repository. Paths a run creates (``run.dir/...``, ``iter_NNNNNNN/``),
absolute example paths and other projects' files are not repository paths and are skipped."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_SUFFIXES = (".py", ".md", ".sh", ".sbatch", ".yaml", ".cpp", ".cu", ".h", ".toml")
PATH = re.compile(r"(?<![\w./-])([\w.-]+(?:/[\w.-]+)*/?)")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def _mentions(text: str) -> list[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # command examples create their own paths
    return [m.group(1) for m in PATH.finditer(prose)]


def test_docs_name_only_files_that_exist():
    files = _tracked()
    dirs = {"/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)}
    names = {f.rsplit("/", 1)[-1] for f in files}
    dir_names = {d.rstrip("/").rsplit("/", 1)[-1] for d in dirs}
    missing = []
    for doc in ["README.md", *sorted(f for f in files if f.startswith("docs/") and f.endswith(".md"))]:
        for token in _mentions((ROOT / doc).read_text()):
            first = token.split("/", 1)[0]
            if re.fullmatch(r"\.\w+|\w+/s", token):  # a file extension, a rate ("docs/s")
                continue
            if token.startswith("../"):  # outside the repository
                missing.append(f"{doc}: {token}")
            elif "/" in token.rstrip("/") or token.endswith("/"):
                if first not in dir_names:  # not a repository path: run outputs, other projects
                    continue
                if token not in files and token not in dirs:
                    missing.append(f"{doc}: {token}")
            elif token.endswith(SOURCE_SUFFIXES) and token not in names:
                missing.append(f"{doc}: {token}")
    assert not missing, "docs name files that are not in the repository:\n" + "\n".join(missing)
