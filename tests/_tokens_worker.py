"""Run by tests/test_tokens.py in a fresh process: accelerate.debug_launcher forks 2 CPU processes (gloo), each
a SelectiveTrainer with Rho-1 token selection for one optimizer step (accumulation 2), recording its
micro-batches and the step's divisor, and saving them with the trained parameters to ``out/rank{r}.pt``."""

import os
import sys

import torch
from accelerate import debug_launcher

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def train(out: str) -> None:
    from test_tokens import TokenRecording, gpt2, lm_data, sgd_args

    from sbsampler.tokens import TokenSelection

    t = TokenRecording(model=gpt2(0), args=sgd_args(out), train_dataset=lm_data(),
                       tokens=TokenSelection(0.3, gpt2(1)))
    t.train()
    rank = t.accelerator.process_index
    torch.save({"batches": t.batches, "num_items": [int(n) for n in t.num_items],
                "params": {k: v.detach().clone() for k, v in t.accelerator.unwrap_model(t.model).state_dict().items()},
                "world": t.accelerator.num_processes},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    debug_launcher(train, args=(sys.argv[1],), num_processes=2)
