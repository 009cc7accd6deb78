"""Memory the episode sampler adds to the dataset's own scans, per voxel, and its draw rate.

Builds an in-memory dataset of synthetic scans (CT-sized by default), loads them, then
builds the training sampler on them, in a fresh process per label source, and prints one
JSON line each: voxels, the dataset's resident memory, what the sampler added above it
(bytes per voxel of the training scans) and episodes drawn per second at 256 px.

    python benchmarks/episode_memory.py                        # 6 scans of 120 x 512 x 512
    python benchmarks/episode_memory.py --scans 2 --size 24x64x64   # smoke
"""

from __future__ import annotations

import argparse

from _child import run_children

_CHILD = """
import json, sys, time
import numpy as np
from fsmis_bench.data.base import Volume, VolumeDataset
from fsmis_bench.protocol.settings import EvalGroup
from fsmis_bench.training.episodes import EpisodeSampler

labels, scans = sys.argv[1], int(sys.argv[2])
depth, height, width = map(int, sys.argv[3:6])

def resident_gib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 2**20

class Scans(VolumeDataset):
    label_map = {"liver": 1, "spleen": 2}
    test_organs = ("liver", "spleen")
    def _case_ids(self):
        return [str(k) for k in range(scans)]
    def _load(self, case_id, with_supervoxels):
        rng = np.random.default_rng(int(case_id))
        z, y, x = np.ogrid[:depth, :height, :width]
        label = np.zeros((depth, height, width), np.int32)
        label[((z - depth / 2) / (0.3 * depth)) ** 2 + ((y - height / 2) / (0.2 * height)) ** 2
              + ((x - width / 3) / (0.15 * width)) ** 2 < 1] = 1
        label[((z - depth / 2) / (0.2 * depth)) ** 2 + ((y - height / 2) / (0.1 * height)) ** 2
              + ((x - 0.7 * width) / (0.08 * width)) ** 2 < 1] = 2
        image = (rng.normal(size=label.shape) * 10 + 40 * label).astype(np.float32)
        supervoxels = ((z // 4) * 16 + (y * 4 // height) * 4 + x * 4 // width).astype(np.int32) + 1
        return Volume(case_id, image, label, supervoxels if with_supervoxels else None)

dataset = Scans()
base = resident_gib()
for case_id in dataset.case_ids():
    dataset.load(case_id, with_supervoxels=labels == "supervoxels")
loaded = resident_gib()
group = (EvalGroup("all", ("liver",)) if labels == "supervoxels"
         else EvalGroup("liver", ("liver",), train_organs=("spleen",)))
sampler = EpisodeSampler(dataset, dataset.case_ids(), group, train_labels=labels, image_size=256, seed=0,
                         min_fg_pixels=min(200, height * width // 50))  # the protocol floor, scaled for a smoke size
held = resident_gib()
began = time.perf_counter()
for index in range(200):
    sampler.episode(index)
rate = 200 / (time.perf_counter() - began)
voxels = scans * depth * height * width
print(json.dumps({"labels": labels, "scans": scans, "shape": [depth, height, width], "voxels": voxels,
                  "dataset_gib": round(loaded - base, 3), "sampler_added_gib": round(held - loaded, 3),
                  "sampler_bytes_per_voxel": round((held - loaded) * 2**30 / voxels, 2),
                  "episodes_per_s": round(rate, 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--size", default="120x512x512", help="each scan as DEPTHxHEIGHTxWIDTH")
    parser.add_argument("--labels", nargs="+", default=["gt", "supervoxels"], choices=["gt", "supervoxels"])
    args = parser.parse_args(argv)
    shape = args.size.lower().split("x")
    return run_children(_CHILD, ([labels, str(args.scans), *shape] for labels in args.labels))


if __name__ == "__main__":
    raise SystemExit(main())
