"""What ``train.compile`` costs before it pays: the first (compiling) training step, the number
of graphs compiled, and the steps after it, on the CPU through the engine's step.

Compilation time is what decided whether a compile scope could be measured on a lent GPU at
all (``train.compile_scope=blocks`` outlasted 100 s for SD-1.5 there). Graph count and
first-step time on the CPU compare scopes with each other before a GPU is at hand; the
inductor caches are switched off, so every run compiles from scratch.

    python benchmarks/compile_cost.py method=sdfsmis backbone=tiny train.channels_last=true \\
        method.vae_dtype=bfloat16 train.compile=default train.compile_scope=norms

Prints one JSON line: the overrides, ``first_step_s`` (compilation included),
``unique_graphs`` (dynamo's count: forward graphs; their backward graphs compile with
them), ``step_s`` (mean of the next ``--steps``) and the torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # compile from scratch, before torch loads

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine_check import _accelerator, _build, _config, engine_path  # noqa: E402


def compile_cost(overrides: list[str], steps: int = 3) -> dict[str, Any]:
    """Build the method of ``overrides`` on the CPU and time its first step and ``steps`` more."""
    device = torch.device("cpu")
    overrides = ["pretrained=false", "device=cpu", "train.num_workers=0", *overrides]
    cfg = _config(overrides)
    torch._dynamo.reset()
    counters.clear()
    _, step, next_batches = engine_path(_build(overrides, device), cfg, _accelerator(device, "no"),
                                        steps=1 + steps, workers=0)
    began = time.perf_counter()
    first_loss = float(step(next_batches()))
    first_step_s = time.perf_counter() - began
    graphs = int(counters["stats"]["unique_graphs"])
    began = time.perf_counter()
    for _ in range(steps):
        step(next_batches())
    return {"check": "compile_cost", "overrides": overrides, "first_step_s": round(first_step_s, 2),
            "unique_graphs": graphs, "step_s": round((time.perf_counter() - began) / steps, 3),
            "first_loss": round(first_loss, 7), "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="fsmis-bench config overrides (method=..., train.compile=...)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first (default 3)")
    args = parser.parse_args(argv)
    print(json.dumps(compile_cost(args.overrides, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
