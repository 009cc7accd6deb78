"""The episode sampler and EP1 hold each scan once: the dataset's own arrays, normalised
slice by slice (``Normalisation``), with the numbers of a whole-volume normalised copy."""

from __future__ import annotations

import numpy as np
import pytest

from fsmis_datasets.phantom import Phantom
from fsmis_bench.data.base import INPUT_NORMS, Normalisation, Volume, VolumeDataset, normalise_volume
from fsmis_bench.protocol.ep1 import build_test_episodes
from fsmis_bench.protocol.settings import EvalGroup
from fsmis_bench.training.episodes import EpisodeSampler


def _volume(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 300.0, size=shape) - 200.0).astype(dtype)


@pytest.mark.parametrize("mode", INPUT_NORMS)
@pytest.mark.parametrize("volume", [
    _volume((5, 33, 47), np.float32),
    _volume((3, 256, 256), np.float32, seed=1),
    _volume((4, 20, 20), np.float64, seed=2),  # cast to float32 like the whole volume
    np.full((2, 8, 8), 5.0, np.float32),  # constant: minmax's range floor, zscore's std floor
    np.zeros((1, 9, 9), np.float32),
], ids=["odd", "256", "float64", "constant", "zeros"])
def test_a_slice_normalised_alone_is_the_whole_volumes_slice_bit_for_bit(mode, volume):
    whole = normalise_volume(volume, mode)
    normalise = Normalisation.of(volume, mode)
    assert whole.dtype == np.float32
    for z in range(volume.shape[0]):
        part = normalise(volume[z])
        assert part.dtype == np.float32 and np.array_equal(part, whole[z])
    chosen = np.array([volume.shape[0] - 1, 0])  # EP1 takes fancy-indexed slices
    assert np.array_equal(normalise(volume[chosen]), whole[chosen])


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown normalisation 'robust'"):
        Normalisation.of(np.zeros((1, 2, 2), np.float32), "robust")


class _Normalised(VolumeDataset):
    """``base``'s scans with their images normalised as a whole volume up front: what the
    sampler held before it kept the dataset's arrays (then read with ``norm="none"``)."""

    def __init__(self, base: VolumeDataset, mode: str) -> None:
        super().__init__()
        self.base, self.mode = base, mode
        self.label_map, self.test_organs = base.label_map, base.test_organs

    def _case_ids(self):
        return self.base.case_ids()

    def _load(self, case_id, with_supervoxels):
        volume = self.base.load(case_id, with_supervoxels)
        return Volume(case_id, normalise_volume(volume.image, self.mode), volume.label, volume.supervoxels)


@pytest.mark.parametrize("mode", ["zscore", "minmax"])
@pytest.mark.parametrize("labels", ["supervoxels", "gt"])
@pytest.mark.parametrize("rule", ["reference", "same_slice"])
def test_episodes_are_those_of_whole_volume_normalised_copies(mode, labels, rule):
    phantom = Phantom(n_cases=3, n_slices=12, size=64)
    group = (EvalGroup("all", ("liver",)) if labels == "supervoxels"
             else EvalGroup("liver", ("liver",), train_organs=("spleen", "left_kidney", "right_kidney")))
    options = dict(train_labels=labels, image_size=48, seed=3, rule=rule, min_fg_pixels=20)
    sampler = EpisodeSampler(phantom, phantom.case_ids(), group, norm=mode, **options)
    copies = EpisodeSampler(_Normalised(phantom, mode), phantom.case_ids(), group, norm="none", **options)
    for index in range(12):
        for ours, theirs in zip(sampler.episode(index), copies.episode(index)):
            assert np.array_equal(ours, theirs)


def test_the_sampler_holds_the_datasets_arrays_and_no_copies():
    phantom = Phantom(n_cases=2, n_slices=10, size=48)
    for labels, group in (("supervoxels", EvalGroup("all", ("liver",))),
                          ("gt", EvalGroup("liver", ("liver",), train_organs=("spleen",)))):
        sampler = EpisodeSampler(phantom, phantom.case_ids(), group, train_labels=labels, min_fg_pixels=20)
        for case, case_id in zip(sampler.cases, phantom.case_ids()):
            volume = phantom.load(case_id, with_supervoxels=labels == "supervoxels")
            assert case.image is volume.image
            assert case.classes is (volume.supervoxels if labels == "supervoxels" else volume.label)


def test_ep1_slices_are_the_whole_volume_normalised_slices():
    phantom = Phantom(n_cases=4, n_slices=14, size=40)
    fold = phantom.case_ids()[:3]
    support, queries = build_test_episodes(phantom, fold, "liver", supp_idx=1, norm="zscore")
    scan = phantom.load(support.case_ids[0])
    whole = normalise_volume(scan.image, "zscore")
    assert np.array_equal(support.images[:, 0], whole[support.slice_indices[:, 0]])
    for query in queries:
        whole = normalise_volume(phantom.load(query.case_id).image, "zscore")
        assert np.array_equal(query.images, whole[query.slice_indices])
