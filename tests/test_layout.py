"""The house (issue 27): no import circle among sbsampler's modules, counting every relative import (at the top,
under TYPE_CHECKING, or inside a function), and one file per strategy."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sbsampler"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(name: str, path: Path) -> set[str]:
    """The sbsampler modules ``name`` imports: ``from .x import y`` is module x (or x.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES and a.name != "sbsampler"}
    return {m for m in found if m in MODULES and m != name}


def graph() -> dict[str, set[str]]:
    out = {}
    for name, path in MODULES.items():
        edges = imports(name, path)
        if path.name == "__init__.py":  # a package re-exports its own rooms: not an edge back into them
            edges = {e for e in edges if not e.startswith(name + ".")}
        out[name] = {e for e in edges if not name.startswith(e + ".")}  # nor a room's import of its own package
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return found


def test_the_graph_sees_known_edges():
    g = graph()
    assert "sbsampler.epoch" in g["sbsampler.loader"] and "sbsampler.clock" in g["sbsampler.select"]
    assert "sbsampler.strategies.base" in g["sbsampler.strategies.sb"]
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # the detector finds a circle


def test_no_import_circle():
    assert cycles(graph()) == []


def test_one_file_per_strategy():
    import sbsampler as sb

    for cls in sb.STRATEGIES.values():
        assert cls.__module__.startswith("sbsampler.strategies.") and cls.__module__ != "sbsampler.strategies.base"
    files = {cls.__module__ for cls in sb.STRATEGIES.values()}
    assert len(files) == len(sb.STRATEGIES)  # every registered rule in its own file


def test_results_files_stay_small_and_machine_readable():
    import json

    results = PKG.parent / "benchmarks" / "results"
    files = list(results.rglob("*.json")) + list(results.rglob("*.jsonl"))
    assert files
    for path in files:
        text = path.read_text()
        assert text.count("\n") <= 3000, f"{path} has {text.count(chr(10))} lines"
        if path.suffix == ".jsonl":
            assert all(json.loads(line) for line in text.splitlines())
        else:
            assert isinstance(json.loads(text), dict)
