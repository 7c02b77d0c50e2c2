"""What produced a run: the versions of hlora and the libraries it trains with, and, when hlora runs from
a git checkout, that checkout's commit. ``summary.json`` keeps it under ``provenance``, so a finished cell
says which code ran it (the results grids run on fixed commits, checked out beside the main tree).

It is read when a run (or a resumed part of it) starts, not when it ends, so that a checkout that moves
while a run trains does not relabel the run. The checkpoint keeps one entry per part that ran on other
code than the part before (``segments``); a run resumed on other code says so in ``resumed_from``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: the libraries whose versions a result depends on (flwr: only where installed)
LIBRARIES = ("torch", "transformers", "peft", "flwr")


def source_commit(package_dir: Path = Path(__file__).parent) -> str | None:
    """The commit of the git checkout ``package_dir`` is tracked in, with ``-dirty`` when its tracked files
    there differ from it; None for an installed wheel (not tracked by any checkout), without git, or where
    git refuses the checkout (owned by another user: git's "dubious ownership")."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # git status: no index lock a user's commit would meet

    def git(*args: str) -> subprocess.CompletedProcess:
        cmd = ["git", "-C", str(package_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env)

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


def segments(earlier: list[dict[str, Any]] | None, resumed: bool) -> list[dict[str, Any]]:
    """The code of each part of a run, this one last: ``earlier`` (a checkpoint's) plus this process's
    provenance unless it equals the last part's. A resumed run whose checkpoint predates provenance gets an
    empty entry for its first part (its code is not known)."""
    parts = list(earlier) if earlier else ([{}] if resumed else [])
    now = provenance()
    return parts if parts and parts[-1] == now else [*parts, now]


def code_label(part: dict[str, Any]) -> str:
    """One part's code in a word: its commit, else its hlora version (``hlora 0.1.0``), ``?`` when unknown."""
    return part.get("git_commit") or (f"hlora {part['hlora']}" if part.get("hlora") else "?")


def summary_provenance(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s ``provenance``: the last part's, with ``resumed_from`` (the earlier parts'
    :func:`code_label`) when the run was resumed on other code."""
    out = dict(parts[-1])
    if len(parts) > 1:
        out["resumed_from"] = [code_label(p) for p in parts[:-1]]
    return out
