"""The docs stay true to the code: docs/configuration.md names every PROXY_*, EXOSCALE_* and
OLLAMA_* variable the code uses and no other, and every relative link in README.md and docs/
points at a file (and heading) that exists. Plain file reading, no servers: quick."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest


def _root() -> Path:
    """The repository: the nearest folder above this file with pyproject.toml (wherever under
    tests/ this file sits)."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError("no pyproject.toml above tests/unit/test_docs.py")


ROOT = _root()
CONFIG_PAGE = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A whole variable name: `PROXY_IDLE_*` and `EXOSCALE_*` (families, not names) do not match.
NAME = re.compile(r"(?:PROXY|EXOSCALE|OLLAMA)_[A-Z0-9]+(?:_[A-Z0-9]+)*")
NAME_IN_TEXT = re.compile(rf"(?<![\w]){NAME.pattern}(?![\w*])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def code_names() -> dict[str, str]:
    """Each variable name the code spells as a whole string literal ("PROXY_TICK", the values of
    infra/settings.py's ENV_NAMES, os.environ.get("OLLAMA_API_KEY")), with a file using it.
    Names inside messages (f"PROXY_BIND={value!r} …") are not literals of their own."""
    names: dict[str, str] = {}
    for package in ("proxy", "infra"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and NAME.fullmatch(node.value):
                    names.setdefault(node.value, str(path.relative_to(ROOT)))
    return names


def documented_names(text: str) -> set[str]:
    return set(NAME_IN_TEXT.findall(text))


def test_the_code_reads_the_settings_this_test_knows_of():
    """The search finds the settings where they are read (a guard on the search itself)."""
    names = code_names()
    for expected in ("PROXY_TICK", "PROXY_API_KEYS", "EXOSCALE_ZONE", "EXOSCALE_ALLOWED_CIDRS",
                     "OLLAMA_MODEL", "PROXY_MODEL_VOLUME_GB", "EXOSCALE_API_KEY"):
        assert expected in names, f"{expected} is no longer a literal in proxy/ or infra/"


def test_every_variable_the_code_reads_is_on_the_configuration_page():
    documented = documented_names(CONFIG_PAGE.read_text())
    missing = {name: where for name, where in code_names().items() if name not in documented}
    assert not missing, f"read by the code but not in docs/configuration.md: {missing}"


def test_every_variable_on_the_configuration_page_is_read_by_the_code():
    extra = documented_names(CONFIG_PAGE.read_text()) - set(code_names())
    assert not extra, f"in docs/configuration.md but read nowhere in proxy/ or infra/: {extra}"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (outside code blocks)."""
    text = FENCE.sub("", page.read_text())
    found = set()
    for line in text.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, fragment = target.partition("#")
        # Relative to the page, as GitHub resolves it; never outside the repository.
        file = (page.parent / path).resolve() if path else page
        if ROOT not in file.parents and file != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not file.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no such heading in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_pages_the_readme_promises_exist():
    for name in ("configuration", "operating", "gpu-server", "several-hosts", "security",
                 "benchmarks", "RELIABILITY"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
