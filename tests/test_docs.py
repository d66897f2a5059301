"""The repository's documents hold together: README.md stays a newcomer's page (at most 20 KB, the rest in
benchmarks/README.md, configs/README.md, gains/README.md, gains/METHOD.md, gains/METRICS.md), every relative
link in them reaches a file of the repository (and a heading, for `#anchors`), and no code, config or test
points at documents a clone does not contain."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p for p in [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("gains/*.md")] if p.is_file())
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lstrip("#").strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    in_code, out = False, set()
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(_anchor(line))
    return out


def test_readme_is_at_most_20_kb():
    assert (ROOT / "README.md").stat().st_size <= 20_000


def test_the_documents_are_found():
    names = {str(p.relative_to(ROOT)) for p in DOCS}
    assert {"README.md", "benchmarks/README.md", "configs/README.md", "gains/README.md", "gains/METHOD.md",
            "gains/METRICS.md"} <= names, names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_a_heading(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):  # http(s):, mailto: — not ours to check offline
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists() or ROOT not in path.parents and path != ROOT:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not broken, broken


def test_nothing_points_at_documents_outside_the_repository():
    """The developers' notes (GAINS_METHOD.md, METRICS.md and DESIGN.md at the top level, a shared folder)
    are not part of a clone; code, configs, tests and documents cite gains/METHOD.md and gains/METRICS.md."""
    pattern = re.compile(r"GAINS_METHOD\.md|(?<![\w/[(])METRICS\.md|DESIGN\.md|shared/docs")  # [..](METRICS.md): a link beside it
    files = [*ROOT.glob("*.py"), *ROOT.glob("gains/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("configs/*.yaml"), *DOCS]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files if p != Path(__file__).resolve()
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
