"""Stage the wheels an offline GPU machine lacks, in transfers of at most 64 MiB.

The lent GPU machine (Python 3.12, torch 2.11+cu130, no internet; ../shared/reference/gpu_path.md)
has no megatron-core, Transformer Engine or DALI, and files reach it at most 64 MiB per call.
This script, run on a CPU machine with PyPI access:

  download   pip-downloads the pinned wheels for cp312 manylinux x86_64 (no dependency
             resolution: every name and version is pinned here) into STAGE/wheels/;
  build-te   builds transformer_engine_torch from its sdist against torch 2.11.0+cu130 in a
             Python 3.12 venv (host C++ only: no GPU needed; ~12 min on 2 cores);
  pack       splits every wheel into parts of at most --part-mib MiB, writes manifest.json
             (sha256 of each wheel and each part) and groups the parts into folders
             STAGE/send/gNN/ of at most --call-mib MiB: one device call carries one folder;
  assemble   (on the GPU machine) joins the parts found under the given folders, checks every
             sha256 against the manifest and writes the wheels, ready for
             ``pip install --no-index --no-deps --target DIR wheels/*.whl``.

Usage: python bench/stage_wheels.py download|build-te|pack [--stage .whl/stage] [--only te,dali,mcore]
       python bench/stage_wheels.py assemble --stage DIR [--out DIR] PART_DIR...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MiB = 2**20
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for n in (17, 27, 28, 34, 35) for a in ("--platform", f"manylinux_2_{n}_x86_64")],
            "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
# Pinned sets (exact versions, installed with --no-deps): what the GPU machine lacks.
WHEELS = {
    "mcore": ["megatron-core==0.19.2", "webdataset==1.0.2", "braceexpand==0.1.7"],
    "te": ["transformer_engine==2.20.2", "transformer_engine_cu13==2.20.2",
           "nvidia-cudnn-frontend==1.16.0", "nvdlfw-inspect==0.2.2", "pydantic==2.12.5",
           "pydantic_core==2.41.5", "annotated-types==0.7.0", "typing-inspection==0.4.2",
           "importlib-metadata==8.7.0", "zipp==3.23.0"],
    "dali": ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20",
             "nvidia-libnvcomp-cu13==5.3.0.16"],
}
TE_TORCH = "transformer_engine_torch==2.20.2"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def download(stage: Path, only: list[str]) -> None:
    out = stage / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    for name in only:
        for pin in WHEELS[name]:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *PLATFORM, "-d", str(out),
                            pin], check=True)


def find_python312() -> str:
    """A Python 3.12 that runs (pyenv's shims exist without a selected version, so try each)."""
    import glob

    for candidate in [*sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12")),
                      shutil.which("python3.12")]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit("build-te: no working Python 3.12 found; pass --python312 PATH")


def build_te_torch(stage: Path, python312: str) -> None:
    """gpu_path.md's recipe: a cp312 venv with torch 2.11.0 (+cu130 from PyPI) and the CUDA
    headers torch's wheels leave out; TE's torch extension is host C++ resolved at run time."""
    venv = stage / "venv312"
    if not venv.exists():
        subprocess.run([python312, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.11.0", "nvidia-cuda-crt==13.0.88.*", "nvidia-cuda-cccl==13.0.85.*",
                    "setuptools", "wheel", "pybind11", "ninja"], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    sdist = stage / "sdist"
    subprocess.run([py, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--no-binary",
                    "transformer_engine_torch", TE_TORCH, "-d", str(sdist)], check=True)
    env = {**os.environ, "NVTE_PYTORCH_FORCE_BUILD": "TRUE", "NVTE_CUDA_ARCHS": "90", "MAX_JOBS": "2",
           "CUDA_HOME": "/usr/local/cuda", "NVTE_BUILD_USE_NVIDIA_WHEELS": "1",
           "CPLUS_INCLUDE_PATH": f"{site}/nvidia/cu13/include/cccl"}
    tarball = next(sdist.glob("transformer_engine_torch-*.tar.gz"))
    subprocess.run([py, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", str(tarball),
                    "-w", str(stage / "wheels")], check=True, env=env)


def pack(stage: Path, part_mib: int, call_mib: int) -> dict:
    """Split each wheel into parts; group parts into per-call folders; write the manifest."""
    wheels = sorted((stage / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {stage / 'wheels'}: run `download` (and `build-te`) first")
    send = stage / "send"
    shutil.rmtree(send, ignore_errors=True)
    parts, manifest = [], {"wheels": {}}
    tmp = stage / "parts"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for wheel in wheels:
        entry = {"sha256": sha256(wheel), "size": wheel.stat().st_size, "parts": []}
        with open(wheel, "rb") as f:
            for i, block in enumerate(iter(lambda: f.read(part_mib * MiB), b"")):
                name = f"{wheel.name}.part{i:02d}"
                (tmp / name).write_bytes(block)
                entry["parts"].append({"name": name, "sha256": hashlib.sha256(block).hexdigest()})
                parts.append((tmp / name, len(block)))
        manifest["wheels"][wheel.name] = entry
    groups: list[list] = []  # first fit decreasing: fewest calls
    for path, n in sorted(parts, key=lambda x: -x[1]):
        fit = next((g for g in groups if g[0] + n <= call_mib * MiB), None)
        if fit is None:
            groups.append(fit := [0])
        fit[0] += n
        fit.append(path)
    groups = [g[1:] for g in groups]
    for g, members in enumerate(groups, 1):
        folder = send / f"g{g:02d}"
        folder.mkdir(parents=True)
        for path in members:
            shutil.move(str(path), folder / path.name)
    shutil.rmtree(tmp)
    manifest["groups"] = [sorted(p.name for p in (send / f"g{g:02d}").iterdir())
                          for g in range(1, len(groups) + 1)]
    (send / "g01" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def assemble(stage_manifest: Path, part_dirs: list[Path], out: Path) -> list[Path]:
    """Join parts into wheels, verifying every part and wheel; raises naming the first bad file."""
    manifest = json.loads(stage_manifest.read_text())
    found = {p.name: p for d in part_dirs for p in d.glob("*.part*")}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for wheel, entry in manifest["wheels"].items():
        missing = [p["name"] for p in entry["parts"] if p["name"] not in found]
        if missing:
            raise SystemExit(f"{wheel}: parts not transferred yet: {', '.join(missing)}")
        target = out / wheel
        h = hashlib.sha256()
        with open(target, "wb") as f:
            for p in entry["parts"]:
                data = found[p["name"]].read_bytes()
                if hashlib.sha256(data).hexdigest() != p["sha256"]:
                    raise SystemExit(f"{found[p['name']]}: sha256 mismatch; transfer it again")
                h.update(data)
                f.write(data)
        if h.hexdigest() != entry["sha256"]:
            raise SystemExit(f"{target}: sha256 of the joined wheel differs from the manifest")
        written.append(target)
    return written


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["download", "build-te", "pack", "assemble"])
    p.add_argument("dirs", nargs="*", type=Path, help="assemble: folders holding the parts")
    p.add_argument("--stage", type=Path, default=Path(".whl/stage"))
    p.add_argument("--only", default="mcore,te,dali")
    p.add_argument("--python312", default=None, help="a Python 3.12 interpreter (default: the first that runs)")
    p.add_argument("--part-mib", type=int, default=55)
    p.add_argument("--call-mib", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("/tmp/wheels"))
    args = p.parse_args()
    if args.command == "download":
        download(args.stage, args.only.split(","))
    elif args.command == "build-te":
        build_te_torch(args.stage, args.python312 or find_python312())
    elif args.command == "pack":
        m = pack(args.stage, args.part_mib, args.call_mib)
        for g, names in enumerate(m["groups"], 1):
            print(f"call {g}: carry {args.stage / 'send' / f'g{g:02d}'} ({len(names)} files)")
    else:
        manifest = next((d / "manifest.json" for d in args.dirs if (d / "manifest.json").is_file()), None)
        if manifest is None:
            raise SystemExit("assemble: no manifest.json among the given folders (it travels in g01)")
        for w in assemble(manifest, args.dirs, args.out):
            print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
