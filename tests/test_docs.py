"""What a reader of the README and docs follows: links that resolve inside the repository,
no pointer to material outside it, extras that exist, and a notebook that finds its sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package supports 3.10

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves_inside_the_repository(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_no_pointer_to_material_outside_the_repository():
    pattern = re.compile(r"\.\./shared|shared/docs|shared/data|design\.md|design sketch")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*DOCS, ROOT / "notebooks" / "results.ipynb"]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


def test_every_extra_the_docs_name_exists():
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    named = {m for p in DOCS for m in re.findall(r'-e "\.\[([\w,-]+)\]"', p.read_text())}
    named = {e for group in named for e in group.split(",")}
    assert named, "the README names its extras"
    assert named <= extras, named - extras
    assert "notebook" in extras  # the notebook's Jupyter


def _notebook_cells() -> list[str]:
    nb = json.loads((ROOT / "notebooks" / "results.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_notebook_opens_the_newest_sweep_from_the_notebooks_folder(tmp_path, monkeypatch):
    multirun = tmp_path / "outputs" / "multirun"
    for name in ("2026-11-30_09-00-00_000001_11", "2026-12-01_10-00-00_000002_12"):
        (multirun / name).mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where Jupyter starts
    namespace: dict = {}
    params, load = _notebook_cells()[:2]
    exec(params, namespace)
    with pytest.raises(FileNotFoundError, match=r"no run folders .* in .*2026-12-01_10-00-00"):
        exec(load, namespace)


def test_the_notebook_says_what_to_do_without_a_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    params, load = _notebook_cells()[:2]
    exec(params, namespace)
    with pytest.raises(FileNotFoundError, match="no sweep under outputs/multirun"):
        exec(load, namespace)
