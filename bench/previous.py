"""The previous proxy as a bench target: the last commit before the HTTP core moved to
uvicorn and aiohttp (issue 14), checked out in its own `git worktree` under bench/out/ with its
own venv, and started as its users start it (`python -m proxy.cli serve`).

Which commit: `--previous REF` if given; else the merge base with `main` while this branch is
not merged (main's latest proxy, the one this change replaces); else the parent of the commit
that deleted `proxy/h1.py`.
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


def _has_old_core(commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}:proxy/h1.py"], cwd=REPO,
                          capture_output=True, check=False).returncode == 0


def commit(ref: str | None = None) -> str:
    """The previous proxy's commit (full hash)."""
    if ref:
        return _git("rev-parse", ref)
    base = _git("merge-base", "HEAD", "main", check=False)
    if base and _has_old_core(base):
        return base
    deleting = _git("log", "-1", "--diff-filter=D", "--format=%H", "--", "proxy/h1.py")
    if not deleting:
        raise RuntimeError("no previous proxy: proxy/h1.py was never deleted here; "
                           "pass --previous REF")
    return _git("rev-parse", f"{deleting}^")


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
