"""Registers the built-in methods, through the same entry point a third party uses.

``display`` names each method in report figures and maps it to the names the published
tables use (``published_results.csv``); its colour comes from the fixed palette in
:mod:`fsmis_bench.reporting.style`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fsmis_bench.plugins import Display, Registry, hookimpl

if TYPE_CHECKING:  # annotations only: the methods are registered by name and imported when built
    from fsmis_bench.method import Method


@hookimpl
def fsmis_register_methods(registry: Registry[Method]) -> None:
    registry.register(
        "support_copy",
        "fsmis_methods.support_copy:SupportCopy",
        description="training-free: each query chunk gets the support's mask (protocol floor)",
        display=Display(name="Support copy"),
    )
    registry.register(
        "prototype",
        "fsmis_methods.prototype:PrototypeNet",
        description="PANet-style masked-average prototype + cosine on a small CNN",
        # PANet-style, but not PANet (small CNN from scratch): no published counterpart
        display=Display(name="Prototype"),
    )
    registry.register("sdfsmis", "fsmis_methods.sdfsmis:SDFSMIS", description="SD-FSMIS full: SII + QE + VTCT (paper)",
                      display=Display(name="SD-FSMIS", published_names=("SD-FSMIS", "SD-FSMIS (SII+QE+VTCT)"),
                                      published_backbone="sd15"))
    # the ablations are shades of SD-FSMIS's colour, lighter with fewer components
    registry.register("sdfsmis_sii", "fsmis_methods.sdfsmis:SDFSMISSii", description="SD-FSMIS ablation: SII only",
                      display=Display(name="SD-FSMIS (SII)", family="sdfsmis", shade=3,
                                      published_names=("SD-FSMIS (SII)",), published_backbone="sd15"))
    registry.register("sdfsmis_qe", "fsmis_methods.sdfsmis:SDFSMISQe", description="SD-FSMIS ablation: SII + QE",
                      display=Display(name="SD-FSMIS (SII+QE)", family="sdfsmis", shade=1,
                                      published_names=("SD-FSMIS (SII+QE)",), published_backbone="sd15"))
    registry.register("sdfsmis_vtct", "fsmis_methods.sdfsmis:SDFSMISVtct", description="SD-FSMIS ablation: SII + VTCT",
                      display=Display(name="SD-FSMIS (SII+VTCT)", family="sdfsmis", shade=2,
                                      published_names=("SD-FSMIS (SII+VTCT)",), published_backbone="sd15"))
    registry.register("ssl_alpnet", "fsmis_methods.ssl_alpnet:SSLALPNet",
                      description="SSL-ALPNet: adaptive local prototype pooling on DeepLabv3-ResNet-101 (ECCV 2020)",
                      display=Display(name="SSL-ALPNet", published_names=("SSL-ALPNet",), published_caveat=(
                          "its published numbers were trained with its own self-supervision (2-D superpixels, "
                          "support and query the same slice under two augmentations), which "
                          "protocol.episode_sampler=same_slice follows (marked non-standard); otherwise it trains, as "
                          "every method here does, on the shared ADNet-family episodes (PROTOCOL.md §5)")))
    registry.register("adnet", "fsmis_methods.adnet:ADNet",
                      description="ADNet: one foreground prototype, anomaly score vs a learned threshold (MedIA 2022)",
                      display=Display(name="ADNet", published_names=("ADNet",)))
    registry.register("qnet", "fsmis_methods.qnet:QNet",
                      description="Q-Net: ADNet + query-informed threshold and prototype refinement, dual-path encoder (2023)",
                      display=Display(name="Q-Net", published_names=("Q-Net",)))
    registry.register("diffews", "fsmis_methods.diffews:DiffewS",
                      description="DiffewS: SD U-Net with K/V-bank support attention, one-step (NeurIPS 2024)",
                      # the paper does not say on which backbone it re-ran DiffewS: any backbone compares
                      display=Display(name="DiffewS", published_names=("DiffewS",)))


@hookimpl
def fsmis_register_backbones(registry: Registry[Any]) -> None:
    registry.register("none", None, description="no diffusion backbone")
    registry.register("tiny", None, description="tiny U-Net + TAESD + tiny encoder, for CPU", display=Display(name="tiny"))
    registry.register("sd15", None, description="Stable Diffusion 1.5 (paper default)", display=Display(name="SD-1.5"))
    registry.register("sd21", None, description="Stable Diffusion 2.1 (comparison)", display=Display(name="SD-2.1"))
