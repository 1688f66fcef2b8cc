"""Every Python snippet of the README and the docs runs as written (issue 34).

A snippet shows the lines a user writes; the names it takes from the user's own program (``model``,
``train_set``, ``opt``, a HuggingFace ``args`` ...) are made up here, small, by the scene the snippet belongs to:
plain PyTorch (an MLP on random features), a HuggingFace classifier or causal LM built from a tiny config, Lightning,
accelerate on the CPU, or FFCV (a ``.beton`` written from made-up images). Only the names a snippet reads are
built, each snippet gets fresh ones, and it runs in a temporary folder (its files land there). A snippet that
needs a framework which is not installed skips, except in CI, where the ``SBSAMPLER_REQUIRE_*`` switches make a
missing install fail.

``test_the_readme_loop_needs_only_the_core_install`` runs the README's loop with every optional package made
unimportable: the 30-second path ``pip install torch==2.13.0 && pip install -e .`` is enough for it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets() -> list[tuple[str, str]]:
    """``(where, code)`` of every ```python block of the README and the docs, in order."""
    out = []
    for page in PAGES:
        if page.is_symlink():
            continue
        blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
        out += [(f"{page.relative_to(ROOT)}#{j + 1}", code) for j, code in enumerate(blocks)]
    return out


SNIPPETS = snippets()


def scene_of(code: str) -> str:
    """Which made-up program a snippet belongs to, from what it uses."""
    if "L.Trainer" in code:
        return "lightning"
    if "TokenSelection" in code or "lm_loss" in code:
        return "lm"
    if "SelectiveTrainer" in code or "model(**" in code:
        return "hf"
    if "ffcv" in code:
        return "ffcv"
    if "accelerator" in code:
        return "accelerate"
    return "plain"


REQUIRES = {"lightning": ("lightning", "SBSAMPLER_REQUIRE_INTEGRATIONS"),
            "lm": ("transformers", "SBSAMPLER_REQUIRE_TRANSFORMERS"),
            "hf": ("transformers", "SBSAMPLER_REQUIRE_TRANSFORMERS"),
            "ffcv": ("ffcv", "SBSAMPLER_REQUIRE_FFCV"),
            "accelerate": ("accelerate", "SBSAMPLER_REQUIRE_INTEGRATIONS")}


class Scene:
    """The user's program around a snippet: each name built on first use, from the factories of its kind."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder, self.built = kind, folder, {}
        self.factories: dict[str, Callable[[], Any]] = {**PLAIN, **KINDS.get(kind, {})}

    def __getitem__(self, name: str) -> Any:
        if name not in self.built:
            self.built[name] = self.factories[name](self)
        return self.built[name]

    def names_for(self, code: str) -> dict[str, Any]:
        used = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
        return {name: self[name] for name in sorted(used & set(self.factories))}


def _mlp(inputs: int = 20, classes: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(inputs, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes))


def _features(n: int = 512) -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def _accuracy(model: torch.nn.Module) -> float:
    x, y = _features(128).tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _process_group(scene: Scene) -> int:
    import torch.distributed as dist

    if not dist.is_initialized():  # one rank over gloo: what torchrun would have set up
        sys.path.insert(0, str(Path(__file__).parent))
        from conftest import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return 0


PLAIN: dict[str, Callable[[Scene], Any]] = {
    "torch": lambda s: torch,
    "nn": lambda s: torch.nn,
    "F": lambda s: torch.nn.functional,
    "np": lambda s: __import__("numpy"),
    "sb": lambda s: __import__("sbsampler"),
    "DataLoader": lambda s: torch.utils.data.DataLoader,
    "TensorDataset": lambda s: torch.utils.data.TensorDataset,
    "DistributedSampler": lambda s: (s["_group"], torch.utils.data.DistributedSampler)[1],
    "DDP": lambda s: (s["_group"], torch.nn.parallel.DistributedDataParallel)[1],
    "_group": _process_group,
    "world_size": lambda s: (s["_group"], 1)[1],
    "rank": lambda s: s["_group"],
    "train_set": lambda s: _features(),
    "model": lambda s: (torch.manual_seed(0), _mlp())[1],
    "net": lambda s: (torch.manual_seed(0), _mlp())[1],
    "ref_model": lambda s: (torch.manual_seed(1), _mlp())[1],
    "make_model": lambda s: _mlp,
    "opt": lambda s: torch.optim.SGD(s["model"].parameters(), lr=0.05),
    "train_loader": lambda s: torch.utils.data.DataLoader(s["sb"].with_indices(s["train_set"]), batch_size=64,
                                                          shuffle=True),
    "train_dl": lambda s: torch.utils.data.DataLoader(_features(256), batch_size=64, shuffle=True),
    "test_accuracy": lambda s: _accuracy,
    "hook": lambda s: s["sb"].ScoringHook(s["model"]),
    "loader": lambda s: s["sb"].SelectiveLoader(s["train_loader"], s["hook"], "sb", fraction=0.25, seed=0),
    "x": lambda s: _features(64).tensors[0],
    "y": lambda s: _features(64).tensors[1],
    "idx": lambda s: torch.arange(64),
    "path": lambda s: s.folder / "checkpoint.pt",
    "epochs": lambda s: 2,
    "E": lambda s: 2,
}


def _hf_args(s: Scene) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(s.folder / "hf"), per_device_train_batch_size=8, max_steps=2,
                             report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)


def _bert(s: Scene) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=3))


def _gpt2(s: Scene) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _token_rows(kind: str, n: int = 32, t: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, t), generator=g)
    labels = ids[:, 0] % 3 if kind == "cls" else ids.clone()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(t, dtype=torch.long), "labels": labels[i],
             "index": torch.tensor(i)} for i in range(n)]


def _dict_loader(kind: str) -> Any:
    return torch.utils.data.DataLoader(_token_rows(kind), batch_size=8, shuffle=True)


def _hf_rows(kind: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "index"} for row in _token_rows(kind)]


KEYS = {"keys": lambda s: s["sb"].BatchKeys(inputs=None, targets="labels", indices="index")}
HF = {"model": _bert, "args": _hf_args, "train": lambda s: _hf_rows("cls"),
      "train_loader": lambda s: _dict_loader("cls"), **KEYS}
LM = {"model": _gpt2, "lm": _gpt2, "ref_model": _gpt2, "ref_lm": _gpt2, "args": _hf_args,
      "train": lambda s: _hf_rows("lm"), "text": lambda s: _hf_rows("lm"),
      "train_loader": lambda s: _dict_loader("lm"), **KEYS}
LIGHTNING = {"L": lambda s: __import__("lightning.pytorch", fromlist=["Trainer"]),
             "train_loader": lambda s: torch.utils.data.DataLoader(_features(256), batch_size=64, shuffle=True)}


def _accelerator(s: Scene) -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=True)


ACCELERATE = {"accelerator": _accelerator,
              "train_dl": lambda s: torch.utils.data.DataLoader(_features(256), batch_size=64, shuffle=True)}


def _images(s: Scene) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), int(i % 10)) for i in range(256)]


FFCV = {"train_set": _images,
        "model": lambda s: (torch.manual_seed(0), torch.nn.Sequential(torch.nn.Flatten(), _mlp(192, 10)))[1]}
KINDS = {"hf": HF, "lm": LM, "lightning": LIGHTNING, "accelerate": ACCELERATE, "ffcv": FFCV}


def test_every_snippet_is_found_and_has_a_scene():
    assert len(SNIPPETS) >= 25, [w for w, _ in SNIPPETS]
    kinds = {scene_of(code) for _, code in SNIPPETS}
    assert kinds == {"plain", "hf", "lm", "lightning", "accelerate", "ffcv"}, kinds


@pytest.mark.parametrize("where,code", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_snippet_runs_as_written(where, code, tmp_path, monkeypatch):
    kind = scene_of(code)
    if kind in REQUIRES:
        module, switch = REQUIRES[kind]
        if os.environ.get(switch) != "1":
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    scene = Scene(kind, tmp_path)
    if "RankSync" in code:
        scene["_group"]
    namespace = {"__name__": "__snippet__", **scene.names_for(code)}
    try:
        exec(compile(code, where, "exec"), namespace)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


BLOCKED = ["sklearn", "scipy", "tqdm", "matplotlib", "lightning", "transformers", "accelerate", "ffcv", "mlxtend",
           "hypothesis", "pandas", "torchdata", "mnist1d"]


def test_the_readme_loop_needs_only_the_core_install(tmp_path):
    """The README's first snippet, with torch, NumPy and Numba alone importable (sbsampler's dependencies)."""
    loop = next(code for where, code in SNIPPETS if where.startswith("README.md"))
    program = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # import raises ImportError, find_spec says "not there"
        import torch
        torch.manual_seed(0)
        x = torch.randn(512, 20)
        train_set = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        """) + loop + "\nprint('modules:', sorted(m for m, v in sys.modules.items() if v is not None and " \
        f"m.partition('.')[0] in {BLOCKED!r}))\n"
    res = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kept 25%" in res.stdout and "modules: []" in res.stdout, res.stdout
