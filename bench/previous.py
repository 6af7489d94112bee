"""The previous proxy as a bench target: the last commit before the HTTP core moved to
uvicorn and aiohttp (issue 14), checked out in its own `git worktree` under bench/out/ with its
own venv, and started as its users start it (`python -m proxy.cli serve`).

Which commit: `--previous REF` if given; else the newest commit (by commit date) in this
history whose tree still has `proxy/h1.py`: the old core as main last had it, with every fix
main made while the async core was on its branch (the parent of the commit that deleted
h1.py lacks those: it is where the branch began, not what it replaced).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .procs import REPO

OUT = REPO / "bench" / "out"


def _git(*args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=check).stdout.strip()


def commit(ref: str | None = None) -> str:
    """The previous proxy's commit (full hash)."""
    if ref:
        return _git("rev-parse", ref)
    history = _git("rev-list", "--date-order", "HEAD").split()
    # One git process asks of every commit whether proxy/h1.py is in its tree.
    answers = subprocess.run(
        ["git", "cat-file", "--batch-check"], cwd=REPO, capture_output=True, text=True,
        check=True, input="".join(f"{c}:proxy/h1.py\n" for c in history),
    ).stdout.splitlines()
    for full, answer in zip(history, answers, strict=True):
        if not answer.endswith("missing"):
            return full
    raise RuntimeError("no previous proxy: no commit here has proxy/h1.py; pass --previous REF")


def checkout(ref: str | None = None, log=print) -> tuple[Path, Path, str]:
    """(the worktree, its venv's python, the short commit), made on first use and kept."""
    full = commit(ref)
    short = full[:9]
    tree = OUT / f"previous-{short}"
    if not (tree / "proxy").is_dir():
        log(f"checking out the previous proxy {short} into {tree}")
        _git("worktree", "add", "--force", "--detach", str(tree), full)
    python = tree / ".venv" / "bin" / "python"
    stamp = tree / ".venv" / ".installed"
    if not stamp.exists():
        log(f"installing the previous proxy {short} into its own venv (once)")
        subprocess.run([sys.executable, "-m", "venv", str(tree / ".venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(tree)], check=True,
                       cwd=tree)
        stamp.touch()
    return tree, python, short
