"""summary.json's provenance: the commit of a source checkout, and nothing for code no checkout tracks."""

import shutil
import subprocess

import pytest

from hlora.provenance import provenance, source_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path):
    """A git checkout holding a package folder ``src/pkg`` with one commit."""
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return tmp_path, pkg


def test_a_checkout_gives_its_commit_and_says_when_it_differs(checkout):
    repo, pkg = checkout
    head = git(repo, "rev-parse", "HEAD").strip()
    assert source_commit(pkg) == head
    (repo / "notes.txt").write_text("untracked, and outside the package\n")
    assert source_commit(pkg) == head
    (pkg / "__init__.py").write_text("x = 2\n")
    assert source_commit(pkg) == head + "-dirty"


def test_an_untracked_package_inside_a_checkout_has_no_commit(checkout):
    repo, _ = checkout
    wheel = repo / ".venv" / "site-packages" / "pkg"  # an installed copy inside the project's folder
    wheel.mkdir(parents=True)
    (wheel / "__init__.py").write_text("x = 1\n")
    assert source_commit(wheel) is None


def test_outside_any_checkout_there_is_no_commit(tmp_path):
    assert source_commit(tmp_path) is None


def test_provenance_names_the_libraries():
    import torch

    out = provenance()
    assert out["torch"] == torch.__version__ and out["python"] and "peft" in out
