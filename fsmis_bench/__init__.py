"""fsmis-bench: a plugin-style benchmark suite for few-shot medical image segmentation."""

import os as _os

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). On a
# 2-core CPU shared with other processes, spinning torch threads made a `prototype`
# training step tens of times slower (0.4 s vs over 20 s, measured with load ~17). It has
# to be set before torch loads its OpenMP runtime, i.e. before `import torch`.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# diffusers imports bitsandbytes whenever it is installed (the `lowmem` extra), and on CPUs
# with AVX512-BF16 bitsandbytes then warns about a 4-bit kernel that nothing here uses.
import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"
