"""Every command the README and the docs (docs/*.md) show runs here, so that a documented command cannot break unseen (issue 22).

Commands are read from the README itself: the lines of its ``bash`` blocks and every inline code span that
starts a shell command (``python ...``, ``bash ...``, ``pip ...``). Each is

- run exactly as written (examples, tools), from the repository root, and must exit 0;
- a benchmark whose full run made a table of the README (minutes to hours): the README must show its ``--quick``
  twin, which runs here and must finish and write its results file (a missed speed target is the benchmark's
  verdict, exit 1 with ``MISS`` lines);
- one of the two commands CI runs itself (``.ci/run``), or an install step (checked against ``pyproject.toml``
  and ``scripts/setup.sh``);
- an ImageNet command for GPUs and the ImageNet ``.beton`` files (or two machines, through ``torchrun``): its
  config file and every flag are checked against the example's declared parameters, since it cannot run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the README and the documentation site's pages (docs/): every command either shows runs here
README = "\n".join([(ROOT / "README.md").read_text()] +
                   [p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")) if not p.is_symlink()])
CI_RUN = (ROOT / ".ci" / "run").read_text()
STARTS = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:python3?|bash|pip|torchrun|accelerate launch) ")


def readme_commands(text: str = README) -> list[str]:
    """The shell commands the README shows, in order, whitespace collapsed."""
    found: list[str] = []
    prose = []
    for j, part in enumerate(re.split(r"^\s*```", text, flags=re.M)):
        if j % 2 == 0:
            prose.append(part)
            continue
        lang, _, body = part.partition("\n")
        if lang.strip() not in ("bash", "sh", "shell", "console"):
            continue
        lines = [ln.strip() for ln in re.sub(r"\\\n\s*", " ", body).splitlines()]
        found += [" ".join(ln.split()) for ln in lines if ln and not ln.startswith("#")]
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        span = " ".join(span.split())
        if STARTS.match(span):
            found.append(span)
    return list(dict.fromkeys(found))


COMMANDS = readme_commands()
CI = ["bash scripts/setup.sh && python benchmarks/demo.py", "python -m pytest -q", "python -m pytest -q -m slow"]


def kind(command: str) -> str:
    if command in CI or command == "python3 -m venv":
        return "ci"
    if command.startswith(("pip install", "SBSAMPLER_NO_FFCV=1 bash scripts/setup.sh")):
        return "install"
    if "train_imagenet.py" in command and "$" in command or command.startswith("D="):
        return "imagenet"  # needs ImageNet, GPUs (and, launched by torchrun with $NODE_RANK, two machines)
    if re.fullmatch(r"python benchmarks/\w+\.py", command) and command not in ("python benchmarks/demo.py",
                                                                            "python benchmarks/figures.py"):
        return "benchmark"
    return "run"


def test_the_readme_shows_commands_of_every_kind():
    kinds = {c: kind(c) for c in COMMANDS}
    assert set(CI) <= set(kinds), "the README's commands (set-up and demo, the quick and the slow tests) are missing"
    assert list(kinds.values()).count("benchmark") >= 6 and list(kinds.values()).count("run") >= 3, kinds


def test_ci_runs_the_readmes_two_commands_in_a_fresh_venv():
    for command in CI:
        assert command in CI_RUN.replace(" -p no:cacheprovider", ""), command
    assert "python3 -m venv" in CI_RUN


def test_install_commands_name_real_extras_and_switches():
    extras = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text(), flags=re.M))
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for command in [c for c in COMMANDS if kind(c) == "install"]:
        for extra in re.findall(r'"\.\[([\w,]+)\]"', command):
            assert set(extra.split(",")) <= extras, command
        for switch in re.findall(r"^(\w+)=", command):
            assert switch in setup, command


def _imagenet_params() -> set[str]:
    source = (ROOT / "examples" / "ffcv_imagenet" / "train_imagenet.py").read_text()
    params = set()
    for section, body in re.findall(r'Section\("(\w+)".*?\)\.params\((.*?)\n\)', source, flags=re.S):
        params |= {f"{section}.{name}" for name in re.findall(r"^\s+(\w+)=Param\(", body, flags=re.M)}
    return params


def test_the_imagenet_commands_name_real_configs_and_flags():
    """They need ImageNet .betons and GPUs; what can be checked here is checked."""
    params = _imagenet_params()
    assert {"data.train_dataset", "selection.strategy", "training.distributed"} <= params
    d = next(c for c in COMMANDS if c.startswith("D="))
    commands = [c.replace("$D", shlex.split(d)[0].partition("=")[2]) for c in COMMANDS
                if kind(c) == "imagenet" and not c.startswith("D=")]
    assert len(commands) >= 5 and any(c.startswith("torchrun") for c in commands)
    for command in commands:
        words = shlex.split(command)
        words = words[next(j for j, w in enumerate(words) if w.endswith("train_imagenet.py")) + 1:]
        config = words[words.index("-C") + 1]
        assert (ROOT / config).is_file(), command
        for flag in (w for w in words if w.startswith("--")):
            assert flag[2:].partition("=")[0] in params, f"{flag} in {command}"


def _run(command: str, tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "python", command
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SBSAMPLER_RESULTS_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, *words[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


RUN = [c for c in COMMANDS if kind(c) == "run"]


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN, ids=[re.sub(r"[^\w.]+", "-", c[7:]) for c in RUN])
def test_command_runs_as_written(command, tmp_path):
    res = _run(command, tmp_path, timeout=900)
    out = res.stdout + res.stderr
    if command.startswith("python benchmarks/") and "--quick" in command:
        # a speed target missed on this machine is the benchmark's verdict (exit 1, MISS lines), not a breakage
        assert "Traceback" not in out and res.returncode in (0, 1), f"{command}\n{out[-4000:]}"
        assert res.returncode == 0 or "MISS " in res.stdout, out[-4000:]
        assert list(tmp_path.glob("*_quick*.json")), f"{command} wrote no results file"
    else:
        assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if kind(c) == "benchmark"])
def test_each_benchmark_shows_its_smoke_run(command):
    """A full run takes minutes to hours: the README shows its --quick twin, which the test above runs."""
    assert any(c.startswith(f"{command} --quick") for c in COMMANDS), command
