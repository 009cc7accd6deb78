"""The SD-FSMIS paper's grid (Tables 1-4) as five Hydra sweeps: print, cost, or launch them.

    python scripts/paper_grid.py                           # the fsmis-bench commands
    python scripts/paper_grid.py --cost --step-seconds 0.212   # runs, trainings, GPU-hours
    python scripts/paper_grid.py --launch hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=240 hydra.launcher.max_num_timeout=5

The cost counts every training the grid needs (setting 2 trains one model per organ group)
at ``train.steps`` of each run's resolved config and the given seconds per optimiser step;
evaluation is left out (milliseconds per slice on a GPU, see the README's measured figures).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

FOLDS = "fold=0,1,2,3,4"

#: (what it reproduces, sweep overrides); together the 80 runs of the paper's tables
GRID: list[tuple[str, list[str]]] = [
    ("Table 1: SD-FSMIS and DiffewS, both abdominal datasets, settings 1 and 2",
     ["method=sdfsmis,diffews", "dataset=abd_ct,abd_mri", "setting=1,2", FOLDS]),
    ("Table 2: cross-domain CT -> MRI", ["method=sdfsmis,diffews", "dataset=abd_ct", "protocol.test_dataset=abd_mri", FOLDS]),
    ("Table 2: cross-domain MRI -> CT", ["method=sdfsmis,diffews", "dataset=abd_mri", "protocol.test_dataset=abd_ct", FOLDS]),
    ("Table 3: SD-FSMIS ablations (the full model is in Table 1)",
     ["method=sdfsmis_sii,sdfsmis_qe,sdfsmis_vtct", "dataset=abd_ct", FOLDS]),
    ("Table 4: SD-FSMIS on SD-2.1 (SD-1.5 is in Table 1)", ["method=sdfsmis", "backbone=sd21", "dataset=abd_ct", FOLDS]),
]


def command(sweep: list[str], launcher: list[str]) -> list[str]:
    return ["fsmis-bench", "run", "-m", *launcher, *sweep]


def cost(step_seconds: float | None) -> None:
    """Print runs, trainings and optimiser steps per sweep (and GPU-hours at ``step_seconds``)."""
    from fsmis_bench.config import compose, expand_sweep
    from fsmis_bench.plugins import registries
    from fsmis_bench.protocol.settings import eval_groups
    from fsmis_bench.records import test_dataset_name

    datasets = registries().datasets
    total_runs = total_trainings = total_steps = 0
    print(f"{'runs':>5} {'trainings':>9} {'steps':>10}  sweep")
    for title, sweep in GRID:
        runs = trainings = steps = 0
        for overrides in expand_sweep(sweep):
            cfg = compose(overrides)
            groups = eval_groups(datasets.get(str(cfg.dataset.name)), datasets.get(test_dataset_name(cfg)),
                                 int(cfg.setting), str(cfg.protocol.exclusion), str(cfg.protocol.train_labels))
            runs += 1
            trainings += len(groups)
            steps += len(groups) * int(cfg.train.steps)
        print(f"{runs:>5} {trainings:>9} {steps:>10}  {title}")
        total_runs, total_trainings, total_steps = total_runs + runs, total_trainings + trainings, total_steps + steps
    print(f"{total_runs:>5} {total_trainings:>9} {total_steps:>10}  total")
    if step_seconds:
        hours = total_steps * step_seconds / 3600
        print(f"training at {step_seconds} s per step: {hours:.1f} GPU-hours "
              f"({hours / 8:.1f} h on 8 GPUs; {total_steps // total_trainings} steps per training: "
              f"{total_steps // total_trainings * step_seconds / 60:.0f} min each)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true", help="count runs, trainings and steps")
    parser.add_argument("--step-seconds", type=float, default=None, help="measured seconds per optimiser step")
    parser.add_argument("--launch", action="store_true", help="run the five sweeps, one after another")
    parser.add_argument("launcher", nargs="*", help="launcher overrides, e.g. hydra/launcher=submitit_slurm ...")
    args = parser.parse_args()
    if args.cost:
        cost(args.step_seconds)
        return 0
    status = 0
    for title, sweep in GRID:
        argv = command(sweep, args.launcher)
        print(f"# {title}\n{shlex.join(argv)}", flush=True)
        if args.launch:
            status = max(status, subprocess.run([sys.executable, "-m", "fsmis_bench.cli", *argv[1:]]).returncode)
    return status


if __name__ == "__main__":
    sys.exit(main())
