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


def record_steps(loader, epochs: int = 1, stop=None) -> list:
    """``(indices, weights)`` of each step of ``epochs`` epochs of ``loader``, up to ``stop`` steps in all."""
    out = []
    for _ in range(epochs):
        for b in loader:
            out.append((b.indices.tolist(), b.weights.tolist()))
            if stop is not None and len(out) == stop:
                return out
    return out
