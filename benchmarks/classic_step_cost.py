"""Cost of one training step and one predicted slice of SSL-ALPNet, ADNet and Q-Net.

For each method: the floating-point operations of one engine training step at batch 1
(``training_loss`` forward + backward, counted by ``torch.utils.flop_counter``: convolutions
and matrix products, the bulk of the work) and of predicting one query slice, and the
measured wall time of both on the chosen device. Prints one JSON line per method on stdout.

FLOPs do not depend on the machine, so they are the honest basis for scaling a CPU
measurement to an accelerator: time = FLOPs / achieved throughput (+ the per-kernel launch
floor on a GPU at batch 1).

    python benchmarks/classic_step_cost.py                       # CPU, ResNet-101, 256 px
    python benchmarks/classic_step_cost.py --device cuda --steps 20
    python benchmarks/classic_step_cost.py --encoder resnet18 --size 64 --steps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _episode(size: int, device: torch.device):
    from fsmis_bench.method import EpisodeBatch

    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    mask = (((x - 0.1) / 0.35) ** 2 + ((y + 0.1) / 0.3) ** 2 <= 1).float()[None, None]
    image = (torch.exp(-(x**2 + y**2)) + 0.5 * mask[0, 0] + 0.1 * torch.randn(size, size, generator=g))[None, None]
    image = (image - image.mean()) / image.std()
    return EpisodeBatch(image[None].to(device), mask[None].to(device), image.to(device), mask.to(device))


def measure(name: str, args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from fsmis_bench.api import build_method

    device = torch.device(args.device)
    torch.manual_seed(0)
    method = build_method([f"method={name}", "pretrained=false", f"method.encoder={args.encoder}"]).to(device)
    batch = _episode(args.size, device)
    optimizer = torch.optim.SGD([p for g in method.param_groups() for p in g["params"]], lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        loss = method(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    method.train()
    with FlopCounterMode(display=False) as counter:
        step()
    train_flops = counter.get_total_flops()
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    method.eval()
    queries = batch.query_images.repeat(args.slices, 1, 1, 1)
    with FlopCounterMode(display=False) as counter:
        method.predict(batch.support_images[0], batch.support_masks[0], queries[:1])
    predict_flops = counter.get_total_flops()
    _sync(device)
    start = time.perf_counter()
    method.predict(batch.support_images[0], batch.support_masks[0], queries)
    _sync(device)
    per_slice = (time.perf_counter() - start) / args.slices
    return {
        "method": name, "encoder": args.encoder, "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "train_step_gflop": round(train_flops / 1e9, 1),
        "train_step_s_median": round(statistics.median(times), 4) if times else None,
        "train_step_s_all": [round(t, 4) for t in times],
        "predict_slice_gflop_incl_support": round(predict_flops / 1e9, 1),
        "predict_s_per_slice": round(per_slice, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ssl_alpnet,adnet,qnet")
    parser.add_argument("--encoder", default="resnet101")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps after the counted one")
    parser.add_argument("--slices", type=int, default=4, help="query slices of the timed prediction")
    args = parser.parse_args(argv)
    for name in args.methods.split(","):
        print(json.dumps(measure(name, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
