"""sbsampler imports and selects where Numba finds no cache folder (a read-only install with no usable $HOME).

Numba raises "cannot cache function ...: no locator available" at import in such
containers (numba issues #4908, #5566). It cannot be reproduced by file permissions
here (the tests run as root), so a fresh process is told to use only cache locators
that fail, through Numba's ``NUMBA_CACHE_LOCATOR_CLASSES``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import warnings, numpy as np, torch\n"
    "warnings.simplefilter('error', RuntimeWarning) if {strict} else None\n"
    "import sbsampler as sb\n"
    "from sbsampler import kernels\n"
    "print(kernels.ecdf(np.arange(4.0), np.array([1.5])).tolist())\n"
    "scores = sb.Scores(loss=torch.rand(64, dtype=torch.float64))\n"
    "print(len(sb.get_strategy('sb', seed=0).select(scores, 16).indices))\n"
)


#: multi-process, example or benchmark runs: `python -m pytest -q -m slow` (CI runs it)
pytestmark = pytest.mark.slow


def _probe(tmp_path, locators: str, strict: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(NUMBA_CACHE_LOCATOR_CLASSES=locators, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", PROBE.format(strict=strict)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_no_usable_locator_falls_back_to_a_temp_cache(tmp_path):
    """Only the user-provided-folder locator, and no NUMBA_CACHE_DIR: every locator fails. The kernels then cache
    in a per-user folder under the temp dir, with no warning."""
    res = _probe(tmp_path, "UserProvidedCacheLocator", strict=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["[0.5]", "16"]
    cached = list(tmp_path.glob("sbsampler-numba-cache-*/**/*.nbi"))
    assert cached, "the kernels were cached in the temp folder"


def test_no_cache_anywhere_compiles_uncached_and_says_so(tmp_path):
    """No locator can ever succeed (IPython's, outside IPython): compile uncached, one RuntimeWarning."""
    res = _probe(tmp_path, "IPythonCacheLocator")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["[0.5]", "16"]
    assert res.stderr.count("no writable Numba cache") == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through read-only modes")
def test_read_only_copy_of_the_package_imports(tmp_path):
    """A non-root user with the package in a read-only folder and HOME pointing nowhere writable."""
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(ROOT / "sbsampler", copy / "sbsampler", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    env = {**os.environ, "PYTHONPATH": str(copy), "HOME": "/nonexistent", "TMPDIR": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    res = subprocess.run([sys.executable, "-c", PROBE.format(strict=False)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
