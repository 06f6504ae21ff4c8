"""The megatron-core versions megatron_emu was written for (CPU and GPU alike).

The model, the CPU layer (``cpu.py``), the distributed-optimizer fixes (``distopt.py``) and the
sync-free replacements of megatron-core internals (``model/embedding.py``, ``model/fused_ce.py``)
reach into megatron-core below its public API, so a version outside ``SUPPORTED`` is refused
with one line; one inside it but not in ``TESTED`` gets one warning (the CPU equivalence tests
are the gate). ``setup.py`` pins the tested version on each Python.
"""

from __future__ import annotations

import warnings

from packaging.version import InvalidVersion, Version

SUPPORTED = ("0.16.1", "0.19.2")  # inclusive range
TESTED = ("0.16.1", "0.19.2")  # 0.16.1: Python 3.11 (CI); 0.19.2: Python 3.12 (CPU suite + GPU tests)


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is outside the supported range (the message says what to do)."""


def installed_version() -> str:
    """megatron-core's version from its distribution metadata (no import of megatron-core)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return "not installed"


def check_megatron_version(version: str | None = None) -> str:
    """Raise ``UnsupportedMegatronError`` outside ``SUPPORTED``; warn once for an untested version
    inside it. Returns the version checked."""
    version = installed_version() if version is None else version
    lo, hi = (Version(v) for v in SUPPORTED)
    try:
        ok = lo <= Version(version) <= hi
    except InvalidVersion:
        ok = False
    if not ok:
        raise UnsupportedMegatronError(
            f"megatron-core {version}: megatron_emu supports {SUPPORTED[0]} to {SUPPORTED[1]} (tested: "
            f"{', '.join(TESTED)}); install the version setup.py pins for this Python (pip install -e .)")
    if version not in TESTED:
        warnings.warn(f"megatron-core {version}: megatron_emu was tested with {', '.join(TESTED)}; run the "
                      f"CPU equivalence tests (tests/distributed) before trusting it", stacklevel=2)
    return version
