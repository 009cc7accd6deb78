"""DiffewS: a Stable Diffusion U-Net as a one-step few-shot segmenter (PROTOCOL.md §7).

Zhu et al., "Unleashing the Potential of the Diffusion Model in Few-shot Semantic
Segmentation" (NeurIPS 2024), as re-implemented for medical data in the SD-FSMIS paper.

DiffewS is SD-FSMIS's predecessor and shares its whole pipeline (``sdfsmis.py``). The
method's own choices are fixed, whatever ``cfg.fidelity`` says:

* support pass: support image latent ++ mask latent (8 channels) through ``conv_in_ref``
  (here ``support_conv_in``, Marigold-initialised); query pass: the query latent alone
  through the pretrained 4-channel ``conv_in``;
* support interaction: the K/V bank — the query's self-attention attends over its own and
  the support's keys/values (``kv_concat``); no added layers, no QE, no VTCT;
* conditioning: the backbone's empty-prompt ("null text") embedding (a fixed zero
  embedding on the ``tiny`` backbone or with ``pretrained=false``);
* objective: the degenerate one-step at t = 1 (``x0 = -model_output``), MSE to the mask
  latent, the whole U-Net trained at lr 1e-5;
* mask: relative threshold 0.25 x the maximum of the decoded prediction over the whole EP1
  chunk (all slices and channels), no connected-component post-processing (original
  DiffewS has none; the SD-FSMIS test script adds it to SD-FSMIS's own predictions).

The pipeline's shared forms (posterior sample or mean in training, uint8 threshold levels,
the augmentation form) follow ``fidelity`` as they do for SD-FSMIS
(``docs/reference_differences.md``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fsmis_bench.method import Method

from .sdfsmis import SDFSMIS, SDFSMISOptions

#: the options DiffewS fixes (the rest — batch size, checkpointing, lr — come from cfg.method).
DIFFEWS_FIXED: dict[str, Any] = {
    "sii": "kv_concat",
    "qe": False,
    "vtct": False,
    "objective": "degenerate_t1",
    "threshold": "relative",
    "threshold_value": 0.25,
    "lcc": False,
}


class DiffewS(SDFSMIS):
    """DiffewS baseline (K/V-bank support attention, null-text conditioning, t = 1 one-step)."""

    default_qe = False
    default_vtct = False
    #: its mask rule is fixed (DIFFEWS_FIXED), so only the chunk size is an option of its own
    inference_options = Method.inference_options

    @classmethod
    def resolve_options(cls, method_cfg: DictConfig, fidelity: str) -> SDFSMISOptions:
        merged = {key: method_cfg.get(key) for key in method_cfg}
        merged.update(DIFFEWS_FIXED)
        return super().resolve_options(DictConfig(merged), fidelity)
