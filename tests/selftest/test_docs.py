"""The docs stay true: the generated pages equal what tools/gen_docs.py makes from the code, and every
relative link in README.md, docs/*.md and results/README.md points at a file that exists."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _gen_docs()


@pytest.mark.parametrize("name", sorted(GEN.PAGES))
def test_generated_page_is_current(name):
    assert (ROOT / "docs" / name).read_text() == GEN.PAGES[name](), (
        f"docs/{name} is stale: run `python tools/gen_docs.py`")


def test_check_names_a_stale_page(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(GEN, "DOCS", tmp_path)
    (tmp_path / "options.md").write_text("stale\n")
    assert GEN.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/options.md is stale" in err and "docs/profiles.md is stale" in err
    assert (tmp_path / "options.md").read_text() == "stale\n"  # --check writes nothing
    assert GEN.main([]) == 0 and GEN.main(["--check"]) == 0


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES + [ROOT / "results" / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    missing = [t for t in _relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def test_pages_link_somewhere():
    """The link check is no vacuous pass: the README links every page of docs/."""
    linked = {(ROOT / t.split("#")[0]).resolve() for t in _relative_links(ROOT / "README.md")}
    assert set(p.resolve() for p in PAGES[1:]) <= linked
