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


@pytest.mark.skipif(shutil.which("mkdocs") is None and os.environ.get("SBSAMPLER_REQUIRE_DOCS") != "1",
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """mkdocs build --strict: a broken link, a missing page or a docstring griffe cannot read fails."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "loader" / "index.html").is_file()
