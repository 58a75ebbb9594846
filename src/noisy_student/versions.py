"""What produced a result, as short hashes: the code that ran and the data it read. Caches
and records are keyed by these (with the config's fingerprint), so a change to the library
or to the data makes a re-run compute again instead of reusing a stale result."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parent


@cache
def code_version() -> str:
    """Hash of every Python source file of this package (paths and contents), so an edited
    checkout, a different install or a different commit each get their own version."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 DVC recorded for the data (``data.dvc``); empty when there is no such file."""
    path = Path(dvc_file)
    if not path.is_file():
        return ""
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))
