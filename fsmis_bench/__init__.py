"""fsmis-bench: a plugin-style benchmark suite for few-shot medical image segmentation."""

__version__ = "0.1.0"
