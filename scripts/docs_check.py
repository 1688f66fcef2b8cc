"""The documentation site as a reader sees it: every page opened in headless Chromium at 1280 px.

    python scripts/docs_check.py            # builds the site (mkdocs build --strict) and checks every page

Fails (exit 1, one line per problem) on a link to a page or file of the site that is not
there, an image that does not load, a console error or a failed request, and any table,
code block or image wider than its column (a reader would have to scroll it sideways), and a
name (code without spaces) in a table broken across lines.
Links to other sites are not followed (nothing leaves this machine). Chromium is Debian's
(``/usr/bin/chromium``, installed by ``scripts/setup.sh``), driven by Playwright for Python
with that executable: no browser is downloaded. ``tests/test_docs_browser.py`` runs it.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 900
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: what does not fit its column: a table wider than its wrapper, a code block that scrolls, an image past the text, a
#: name in a table broken mid-word
_WIDE = r"""() => {
  const content = document.querySelector('.md-content__inner') || document.body;
  const column = content.clientWidth;
  const out = [];
  const shown = el => el.offsetParent !== null;
  for (const t of content.querySelectorAll('table')) {
    if (!shown(t)) continue;
    const box = t.closest('.md-typeset__scrollwrap') || t.parentElement;
    if (t.scrollWidth > Math.min(box.clientWidth, column) + 1)
      out.push(`table ${t.scrollWidth}px wide in a ${Math.min(box.clientWidth, column)}px column: `
               + t.innerText.slice(0, 60).replace(/\s+/g, ' '));
  }
  for (const c of content.querySelectorAll('pre > code, pre')) {
    if (!shown(c)) continue;
    if (c.scrollWidth > c.clientWidth + 1)
      out.push(`code block ${c.scrollWidth}px wide in ${c.clientWidth}px: `
               + c.innerText.slice(0, 60).replace(/\s+/g, ' '));
  }
  for (const c of content.querySelectorAll('td code')) {  // a name in a table broken mid-word: SelectiveBack|prop
    if (!shown(c) || /\s/.test(c.innerText.trim())) continue;
    if (c.getClientRects().length > 1) out.push(`a name broken across lines in a table: ${c.innerText}`);
  }
  for (const i of content.querySelectorAll('img')) {
    if (!shown(i)) continue;
    const w = i.getBoundingClientRect().width;
    if (w > column + 1) out.push(`image ${w}px wide in a ${column}px column: ${i.src}`);
  }
  return out;
}"""
_IMAGES = "() => Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
_LINKS = "() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"


def chromium() -> str | None:
    """The system Chromium's path, or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def unavailable() -> str | None:
    """Why the check cannot run here (no Chromium, no Playwright), or ``None``."""
    if chromium() is None:
        return "Debian's chromium is not installed (apt-get install chromium; scripts/setup.sh does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright; scripts/setup.sh does it)"
    return None


def build(site: Path) -> None:
    """``mkdocs build --strict`` into ``site``."""
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                   cwd=ROOT, check=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@contextlib.contextmanager
def served(site: Path) -> Iterator[str]:
    """The built site served on a free port of 127.0.0.1 (loopback only); yields its base URL."""
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def pages(site: Path) -> list[str]:
    """Every page of the site (its ``index.html`` files), as paths relative to the site."""
    return sorted(str(p.relative_to(site)) for p in site.rglob("index.html"))


def check(site: Path) -> list[str]:
    """The problems of the built ``site``, one line each (empty: none)."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with served(site) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        where = {"page": ""}
        page.on("console", lambda m: problems.append(f"{where['page']}: console {m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"{where['page']}: script error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"{where['page']}: request failed: {r.url}")
                if r.failure != "net::ERR_ABORTED" else None)  # aborted: the next page was opened first
        page.on("response", lambda r: problems.append(f"{where['page']}: HTTP {r.status}: {r.url}")
                if r.status >= 400 else None)
        links: dict[str, str] = {}
        for rel in pages(site):
            where["page"] = rel
            page.goto(base + rel, wait_until="load")
            page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")  # folded too
            problems += [f"{rel}: image does not load: {src}" for src in page.evaluate(_IMAGES)]
            problems += [f"{rel}: {wide}" for wide in page.evaluate(_WIDE)]
            for href in page.evaluate(_LINKS):
                if href.startswith(base):
                    links.setdefault(href.split("#")[0], rel)
        browser.close()
        for href, rel in sorted(links.items()):
            path = urllib.parse.unquote(urllib.parse.urlparse(href).path).lstrip("/")
            target = site / path
            if not (target.is_file() or (target / "index.html").is_file()):
                problems.append(f"{rel}: broken link: {href[len(base) - 1:]}")
    return problems


def main() -> int:
    why = unavailable()
    if why:
        print(f"docs check skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory() as folder:
        site = Path(folder) / "site"
        build(site)
        problems = check(site)
        print(f"{len(pages(site))} pages opened in Chromium at {WIDTH} px: {len(problems)} problems")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
