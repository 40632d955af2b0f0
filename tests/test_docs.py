"""The repository documents itself: links resolve, the README's layout matches the tree, and no
text points at a design document that is not in the repository."""
import pathlib
import re
import subprocess

import pytest

from tests.test_readme import section

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
                    *(ROOT / "docs").rglob("*.md")])


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (e.g. an unpacked sdist)")
    keep = (".py", ".md", ".cpp", ".h", ".sh", ".toml", ".txt", ".cfg", ".in")
    return [ROOT / f for f in out if f.endswith(keep) and not f.startswith("benchmarks/results/")]


def test_no_references_to_an_external_spec():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked_text_files() if p.exists()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if re.search(r"SPEC\s*§", line)]
    assert not hits, f"design-document section references left in: {hits[:10]}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if path and not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def _layout_rows():
    body = section((ROOT / "README.md").read_text(), "Layout")
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert rows, "README.md has no Layout table"
    return [re.findall(r"`([^`]+)`", row.split("|")[1]) for row in rows]


def test_readme_layout_matches_the_tree():
    ops = [p.name for p in (ROOT / "selkd_kernels" / "ops").iterdir()
           if p.is_dir() and (p / "reference.py").exists()]
    assert ops, "no op folders found"
    missing = []
    for paths in _layout_rows():
        for path in paths:
            candidates = [path.replace("<op>", op) for op in ops] if "<op>" in path else [path]
            for cand in candidates:
                if not (ROOT / cand.rstrip("/")).exists():
                    missing.append(cand)
    assert not missing, f"README Layout names paths that do not exist: {missing}"
