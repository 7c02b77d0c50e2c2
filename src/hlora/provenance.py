"""What produced a run: the versions of hlora and the libraries it trains with, and, when hlora runs from
a git checkout, that checkout's commit. ``summary.json`` keeps it under ``provenance``, so a finished cell
says which code ran it (the results grids run on fixed commits, checked out beside the main tree)."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: the libraries whose versions a result depends on (flwr: only where installed)
LIBRARIES = ("torch", "transformers", "peft", "flwr")


def source_commit(package_dir: Path = Path(__file__).parent) -> str | None:
    """The commit of the git checkout ``package_dir`` is tracked in, with ``-dirty`` when its tracked files
    there differ from it; None for an installed wheel (not tracked by any checkout) or without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=20)

    try:
        # a wheel inside some other checkout (a venv in the project folder) is not tracked by it
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    """hlora's version and commit (``git_commit``, when known), the libraries' versions, Python's, the CPU
    architecture."""
    from hlora import __version__

    out: dict[str, Any] = {"hlora": __version__}
    commit = source_commit()
    if commit is not None:
        out["git_commit"] = commit
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    out["machine"] = platform.machine()
    return out
