"""Registers the built-in methods, through the same entry point a third party uses."""

from __future__ import annotations


from fsmis_bench.plugins import hookimpl


@hookimpl
def fsmis_register_methods(registry) -> None:
    registry.register(
        "support_copy",
        "fsmis_methods.support_copy:SupportCopy",
        description="training-free: each query slice gets the support's mask (protocol floor)",
    )
    registry.register(
        "prototype",
        "fsmis_methods.prototype:PrototypeNet",
        description="PANet-style masked-average prototype + cosine on a small CNN",
    )


@hookimpl
def fsmis_register_backbones(registry) -> None:
    registry.register("none", "builtins:None", description="no diffusion backbone")
    registry.register("tiny", "builtins:None", description="tiny U-Net + TAESD + tiny encoder, for CPU")
    registry.register("sd15", "builtins:None", description="Stable Diffusion 1.5 (paper default)")
    registry.register("sd21", "builtins:None", description="Stable Diffusion 2.1 (comparison)")


@hookimpl
def fsmis_config_dirs() -> list[str]:
    # Built-in method configs live in the package's own configs/; nothing extra here.
    return []


