"""fsmis-bench: a plugin-style benchmark suite for few-shot medical image segmentation."""

import os as _os

# How idle OpenMP threads wait between the parallel regions of a step, unless the user chose
# (OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME set). Spinning without end (ACTIVE, or
# libgomp's default of 300k spins) made a `prototype` step tens of times slower on a 2-core
# CPU shared with other processes (0.4 s vs over 20 s at load ~17). Sleeping at once
# (PASSIVE) pays a wake-up per operation instead: the default `fsmis-bench run` took 77 s
# on a quiet 2-core machine, against 60 s with a short spin of 10k iterations (tens of
# microseconds: the gaps between a step's operations), which beside 6 busy processes cost
# 12 % more than sleeping (README, "Measured figures"; benchmarks/openmp_wait.sh).
# libgomp (torch's Linux x86 builds) reads GOMP_SPINCOUNT; LLVM's libomp reads
# KMP_BLOCKTIME, kept at 0 (sleep at once) as before.
# Both have to be set before torch loads its OpenMP runtime, i.e. before `import torch`.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "10000"
    _os.environ["KMP_BLOCKTIME"] = "0"

# diffusers imports bitsandbytes whenever it is installed (the `lowmem` extra), and on CPUs
# with AVX512-BF16 bitsandbytes then warns about a 4-bit kernel that nothing here uses.
import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"
