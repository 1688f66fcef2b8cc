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


def free_port() -> str:
    """A free TCP port on this machine, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_ranks(worker: str, out_dir, *args: str, timeout: int = 300) -> list:
    """Run the 2-process ``worker`` script beside this file (its ranks write ``out_dir/rank{r}.json``) under a
    timeout, which turns a hang (ranks out of step in a collective) into a failure; the two ranks' results."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name(worker)
    subprocess.run([sys.executable, str(script), str(out_dir), free_port(), *args], check=True, timeout=timeout)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in (0, 1)]
