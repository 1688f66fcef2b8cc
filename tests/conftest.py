"""Test configuration: make tests/reference.py importable and keep torch single-threaded."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)


def need(module: str):
    """Import ``module`` for a test file: skip without it, except in CI (SBSAMPLER_REQUIRE_INTEGRATIONS=1),
    where a missing install must fail rather than pass unseen."""
    import importlib

    import pytest

    if os.environ.get("SBSAMPLER_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
