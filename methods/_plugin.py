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
    registry.register("sdfsmis", "fsmis_methods.sdfsmis:SDFSMIS", description="SD-FSMIS full: SII + QE + VTCT (paper)")
    registry.register("sdfsmis_sii", "fsmis_methods.sdfsmis:SDFSMISSii", description="SD-FSMIS ablation: SII only")
    registry.register("sdfsmis_qe", "fsmis_methods.sdfsmis:SDFSMISQe", description="SD-FSMIS ablation: SII + QE")
    registry.register("sdfsmis_vtct", "fsmis_methods.sdfsmis:SDFSMISVtct", description="SD-FSMIS ablation: SII + VTCT")
    registry.register("ssl_alpnet", "fsmis_methods.ssl_alpnet:SSLALPNet", description="SSL-ALPNet: adaptive local prototype pooling on DeepLabv3-ResNet-101 (ECCV 2020)")
    registry.register("adnet", "fsmis_methods.adnet:ADNet", description="ADNet: one foreground prototype, anomaly score vs a learned threshold (MedIA 2022)")
    registry.register("qnet", "fsmis_methods.qnet:QNet", description="Q-Net: ADNet + query-informed threshold and prototype refinement, dual-path encoder (2023)")
    registry.register("diffews", "fsmis_methods.diffews:DiffewS", description="DiffewS: SD U-Net with K/V-bank support attention, one-step (NeurIPS 2024)")


@hookimpl
def fsmis_register_backbones(registry) -> None:
    registry.register("none", None, description="no diffusion backbone")
    registry.register("tiny", None, description="tiny U-Net + TAESD + tiny encoder, for CPU")
    registry.register("sd15", None, description="Stable Diffusion 1.5 (paper default)")
    registry.register("sd21", None, description="Stable Diffusion 2.1 (comparison)")


