"""The documentation (issue 27): the site builds with warnings as errors, every public name has a docstring and a
reference page, the README stays short, and the state-format versions the docs list are the code's."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sbsampler

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def public_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(sbsampler.__path__, "sbsampler.")]
    return ["sbsampler"] + [n for n in names if not any(p.startswith("_") for p in n.split("."))]


def test_every_public_name_has_a_docstring():
    missing = []
    for name in public_modules():
        if name == "sbsampler.ffcv" and importlib.util.find_spec("ffcv") is None:
            continue
        mod = importlib.import_module(name)
        if not (mod.__doc__ or "").strip():
            missing.append(name)
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
            if inspect.isclass(obj) and obj.__module__ == name:
                for key, value in vars(obj).items():
                    fn = value.fget if isinstance(value, property) else value
                    if not key.startswith("_") and inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                        missing.append(f"{name}.{attr}.{key}")
    assert missing == [], f"public names without a docstring: {missing}"


def test_every_public_module_has_a_reference_page():
    pages = "\n".join(p.read_text() for p in (DOCS / "reference").glob("*.md"))
    shown = set(re.findall(r"^::: (sbsampler[\w.]*)", pages, flags=re.M))
    modules = {n for n in public_modules() if n != "sbsampler"}
    packages_shown = {m for m in modules if any(s.startswith(m + ".") for s in shown)}
    assert modules - shown - packages_shown == set()
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (DOCS / "reference").glob("*.md"):
        assert f"reference/{page.name}" in nav, f"{page.name} is not in the site's nav"


def test_the_versions_page_lists_the_codes_state_versions():
    table = (DOCS / "reference" / "versions.md").read_text()
    listed = {k: int(v) for k, v in re.findall(r"^\| `(\w+)` \| (\d+) \|", table, flags=re.M)}
    assert listed == sbsampler.STATE_VERSIONS
    assert re.search(rf"^## {re.escape(sbsampler.__version__)}\b", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)


def test_the_readme_is_short_and_points_to_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 250
    assert "mkdocs" in readme and "docs/" in readme


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_front_page_shows_what_it_is_the_install_the_loop_the_picture_and_whether_it_pays(page):
    """Issue 34: two sentences, the install line, the loop, the headline figure and "will it speed me up?", in that
    order, before anything else."""
    text = (ROOT / page).read_text()
    first_heading = text.index("\n## ")
    top = text[:first_heading]
    intro = top.split("```")[0]
    assert len(re.findall(r"[.!?](\s|$)", intro.partition("\n\n")[2])) <= 3, "what it is, in two sentences"
    install, loop = top.index("pip install torch==2.13.0 && pip install -e ."), top.index("for batch in loader:")
    picture = top.index("paper.png")
    assert install < loop < top.index("**Will it speed me up?**") < picture  # the answer in the first screen
    assert loop - top.index("```python") < 900 and len(top[top.index("```python"):loop].splitlines()) <= 8
    assert text[first_heading:].startswith("\n## Will it speed me up?")
    assert "sbsampler.compare" in text[first_heading:text.index("\n## ", first_heading + 1)]


def _visible(markdown: str) -> str:
    """The text a reader sees before opening anything: folded blocks (``??? note``) left out."""
    out, folded = [], False
    for line in markdown.splitlines():
        if line.startswith("??? "):
            folded = True
            out.append(line.partition('"')[2].rstrip('"'))  # the fold's title shows
            continue
        if folded and (line.startswith("    ") or not line.strip()):
            continue
        folded = False
        out.append(line)
    return "\n".join(out)


def test_the_benchmarks_page_reads_in_1500_words_with_one_figure_a_claim():
    text = (DOCS / "benchmarks.md").read_text()
    visible = _visible(text)
    words = len(re.findall(r"\S+", re.sub(r"!\[[^\]]*\]\([^)]*\)", "", visible)))
    assert words <= 1500, words
    claims = re.split(r"^## ", visible, flags=re.M)[1:]
    folded = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(claims) >= 8
    first = claims[0]
    assert "results/paper.png" in first, "the paper benchmark's plot comes first"
    for claim, whole in zip(claims, folded):
        if claim.startswith("More measurements"):
            continue
        figures = re.findall(r"!\[[^\]]+\]\((results/[^)]+\.png)\)", claim)
        assert len(figures) == 1, claim[:80]
        assert (DOCS / figures[0]).is_file(), figures
        assert re.search(r"`python benchmarks/\w+\.py", claim), f"no command: {claim[:80]}"
        assert re.search(r"^\?\?\? note.*\n    .*\|", whole, flags=re.M | re.S), f"no folded table: {claim[:80]}"


@pytest.mark.parametrize("page", sorted(p.name for p in (DOCS / "guides").glob("*.md")) + ["../getting-started.md"])
def test_each_guide_opens_with_its_task_and_a_snippet(page):
    lines = (DOCS / "guides" / page).read_text().splitlines()
    task = next(i for i, line in enumerate(lines) if line.startswith("**The task:**"))
    snippet = next(i for i, line in enumerate(lines) if line.startswith("```python"))
    heading = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    assert task <= 3 and task < snippet < min(heading, 30), (task, snippet, heading)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs") is None and os.environ.get("SBSAMPLER_REQUIRE_DOCS") != "1",
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """mkdocs build --strict: a broken link, a missing page or a docstring griffe cannot read fails."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "loader" / "index.html").is_file()
