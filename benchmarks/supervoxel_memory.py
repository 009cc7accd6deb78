"""Peak memory and time of ADNet's 3-D supervoxels per voxel of a scan.

Segments synthetic volumes of the given sizes in fresh processes (so that each peak is its
own) and prints one JSON line per size: voxels, the process's peak resident memory above
its start, bytes per voxel and seconds. The per-voxel figure is what
``fsmis_bench.preparation.supervoxels.SEGMENTATION_BYTES_PER_VOXEL`` budgets when
``fsmis-bench supervoxels`` and ``dataset.supervoxels=auto`` choose how many scans to
segment at once.

    python benchmarks/supervoxel_memory.py                       # 40 and 100 slices of 256 x 256
    python benchmarks/supervoxel_memory.py --sizes 24x64x64       # smoke
"""

from __future__ import annotations

import argparse

from _child import run_children

_CHILD = """
import json, resource, sys, time
import numpy as np
from fsmis_bench.preparation.supervoxels import supervoxels_3d
depth, height, width = map(int, sys.argv[1:4])
rng = np.random.default_rng(0)
# a body-like ramp with noise: every voxel above the body threshold, every edge distinct
image = (rng.normal(size=(depth, height, width)) * 20 + np.linspace(0, 500, width)[None, None, :]).astype(np.float32)
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.perf_counter()
supervoxels_3d(image, (3.0, 1.0, 1.0), 5000)
seconds = time.perf_counter() - began
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
voxels = depth * height * width
print(json.dumps({"shape": [depth, height, width], "voxels": voxels, "peak_above_start_gib": round((peak - start) / 2**20, 3),
                  "bytes_per_voxel": round((peak - start) * 1024 / voxels), "seconds": round(seconds, 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["40x256x256", "100x256x256"],
                        help="volumes as DEPTHxHEIGHTxWIDTH")
    args = parser.parse_args(argv)
    return run_children(_CHILD, (size.lower().split("x") for size in args.sizes))


if __name__ == "__main__":
    raise SystemExit(main())
