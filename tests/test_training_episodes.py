"""Training episodes (PROTOCOL.md §5) and their augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsmis_bench.data.base import Volume, VolumeDataset
from fsmis_bench.errors import DataError
from fsmis_bench.protocol.settings import EvalGroup
from fsmis_bench.training.augment import EpisodeAugmenter
from fsmis_bench.training.episodes import EpisodeSampler


class _Stack(VolumeDataset):
    """One scan: supervoxel 7 in slices 2-5 (30x30 px), supervoxel 9 tiny (3x3 px) in 0-1;
    liver (label 1) in slices 3-4."""

    label_map = {"liver": 1, "spleen": 4}
    test_organs = ("liver", "spleen")

    def _case_ids(self):
        return ["1", "2"]

    def _load(self, case_id, with_supervoxels):
        label = np.zeros((8, 40, 40), dtype=np.int32)
        label[3:5, 5:25, 5:25] = 1
        sv = np.zeros_like(label)
        sv[2:6, 5:35, 5:35] = 7
        sv[0:2, 0:3, 0:3] = 9
        image = np.random.default_rng(int(case_id)).normal(size=label.shape).astype(np.float32)
        return Volume(case_id, image, label, sv)


def test_pairs_are_adjacent_slices_of_one_class_and_respect_the_size_floor():
    sampler = EpisodeSampler(_Stack(), ["1"], EvalGroup("all", ("liver",)), augment=False, min_fg_pixels=200)
    assert {k: v.tolist() for k, v in sampler.cases[0].pairs.items()} == {7: [2, 3, 4], 9: [0]}
    for _ in range(20):  # class 9 (9 px) is always rejected; class 7 (900 px) always accepted
        support_image, support_mask, query_image, query_mask = sampler.sample()
        assert support_mask.sum() == query_mask.sum() == 900


def test_setting2_exclusion_removes_slices_from_pairs():
    group = EvalGroup("liver", ("liver",), ("liver",), "any")
    sampler = EpisodeSampler(_Stack(), ["1"], group, augment=False, min_fg_pixels=0)
    # Slices 3 and 4 show the liver and are dropped, which breaks every pair of class 7
    # (2-3, 3-4, 4-5); only class 9's pair (0, 1) is left.
    assert {k: v.tolist() for k, v in sampler.cases[0].pairs.items()} == {9: [0]}
    assert sampler.excluded_slice_count == 2


def test_gt_training_labels_use_only_the_allowed_organs():
    group = EvalGroup("spleen", ("spleen",), train_organs=("liver",))
    sampler = EpisodeSampler(_Stack(), ["1"], group, train_labels="gt", augment=False)
    assert {k: v.tolist() for k, v in sampler.cases[0].pairs.items()} == {1: [3]}


def test_no_episode_possible_is_a_clear_error():
    group = EvalGroup("spleen", ("spleen",), train_organs=("spleen",))
    with pytest.raises(DataError, match="no training episode"):
        EpisodeSampler(_Stack(), ["1"], group, train_labels="gt")


def test_batches_have_the_interface_shapes_and_are_reproducible():
    first = EpisodeSampler(_Stack(), ["1", "2"], EvalGroup("all", ("liver",)), image_size=32, seed=3).batch(4)
    again = EpisodeSampler(_Stack(), ["1", "2"], EvalGroup("all", ("liver",)), image_size=32, seed=3).batch(4)
    assert first.support_images.shape == (4, 1, 1, 32, 32) and first.query_masks.shape == (4, 1, 32, 32)
    assert torch.equal(first.query_images, again.query_images)
    assert set(first.support_masks.unique().tolist()) <= {0.0, 1.0}


def test_augmentation_with_neutral_parameters_is_the_identity():
    neutral = EpisodeAugmenter(gamma=(1, 1), rotate_deg=0, translate_px=0, scale=(1, 1), shear_deg=0, elastic_alpha=0)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    mask = image > 0.5
    out_image, out_mask = neutral(image, mask, np.random.default_rng(1))
    np.testing.assert_allclose(out_image, image, atol=1e-5)
    assert (out_mask == mask).all()


def test_augmentation_translation_moves_content_by_pixels():
    shift_only = EpisodeAugmenter(gamma=(1, 1), rotate_deg=0, translate_px=5, scale=(1, 1), shear_deg=0, elastic_alpha=0)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:20] = True
    rng = np.random.default_rng(0)
    expected_shift = np.random.default_rng(0)
    _, moved = shift_only(mask.astype(np.float32), mask, rng)
    # replay the generator: gamma, angle, shear, scale, then the shift (x, y)
    expected_shift.uniform(1, 1), expected_shift.uniform(0, 0), expected_shift.uniform(0, 0), expected_shift.uniform(1, 1)
    dx, dy = expected_shift.uniform(-5, 5, size=2)
    ys, xs = np.nonzero(moved)
    assert xs.mean() - 14.5 == pytest.approx(dx, abs=0.6)
    assert ys.mean() - 14.5 == pytest.approx(dy, abs=0.6)


def test_full_augmentation_keeps_masks_binary_and_mostly_in_place():
    augmenter = EpisodeAugmenter()
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:44, 20:44] = True
    rng = np.random.default_rng(0)
    for _ in range(10):
        image, out = augmenter(np.random.default_rng(1).random((64, 64)).astype(np.float32), mask, rng)
        assert out.dtype == bool and image.shape == (64, 64)
        overlap = (out & mask).sum() / mask.sum()
        assert 0.5 < overlap and 0.6 < out.sum() / mask.sum() < 1.6


class _MarkingAugmenter(EpisodeAugmenter):
    """Adds 1e3 to an image it applies gamma to and 1e6 to one it warps, so each episode
    shows which side got which part."""

    def gamma(self, image, rng):
        rng.uniform()
        return image + 1e3

    def geometric(self, image, mask, rng):
        rng.uniform()
        return image + 1e6, mask


def test_gamma_and_geometric_sides_are_drawn_independently():
    """Q-Net / SD-FSMIS: gamma on one side, affine + elastic on an independently drawn side
    (PROTOCOL.md §5). Over 4000 episodes every share below is within 5 standard errors."""
    sampler = EpisodeSampler(_Stack(), ["1", "2"], EvalGroup("all", ("liver",)), min_fg_pixels=0, seed=0)
    sampler.augmenter = _MarkingAugmenter()
    n = 4000
    gamma_on_support = geometric_on_support = different = 0
    for _ in range(n):
        support_image, _, query_image, _ = sampler.sample()
        marks = [int(round(float(np.median(im)) / 1e3)) for im in (support_image, query_image)]  # 0, 1, 1000, 1001
        gamma, geometric = [m % 1000 for m in marks], [m // 1000 for m in marks]
        assert sorted(gamma) == [0, 1] and sorted(geometric) == [0, 1]  # each part on exactly one side
        gamma_on_support += gamma[0]
        geometric_on_support += geometric[0]
        different += gamma[0] != geometric[0]
    tolerance = 5 * (0.25 / n) ** 0.5
    assert abs(gamma_on_support / n - 0.5) < tolerance
    assert abs(geometric_on_support / n - 0.5) < tolerance
    assert abs(different / n - 0.5) < tolerance  # the two sides augmented differently


def test_gamma_and_geometric_parts_compose_to_the_full_augmentation():
    augmenter = EpisodeAugmenter()
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    mask = image > 0.5
    whole = augmenter(image, mask, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    parts = augmenter.geometric(augmenter.gamma(image, rng), mask, rng)
    np.testing.assert_array_equal(whole[0], parts[0])
    np.testing.assert_array_equal(whole[1], parts[1])



class _Scans(VolumeDataset):
    """Supervoxel class 5 in every scan; each voxel's value names its scan and slice
    (100 x scan + z), so an episode shows where it came from.

    * "large": class 5 in slices 0-3, 900 px: every pair passes a 200 px floor.
    * "small": class 5 in slices 0-3, 100 px in 0-2 and 400 px in 3: only pair (2, 3) passes.
    * "gap": as "large", plus class 6 in slices 0 and 2 only (two slices, no adjacent pair).
    * "runs": class 5 in slices 0-1 and 3-5 (900 px): two runs, with 1 and 2 pairs.
    """

    label_map = {"liver": 1}
    test_organs = ("liver",)
    codes = {"large": 1, "small": 2, "gap": 3, "runs": 4}

    def _case_ids(self):
        return sorted(self.codes)

    def _load(self, case_id, with_supervoxels):
        label = np.zeros((6, 40, 40), dtype=np.int32)
        sv = np.zeros_like(label)
        if case_id == "small":
            sv[0:3, 0:10, 0:10] = 5
            sv[3, 0:20, 0:20] = 5
        elif case_id == "runs":
            sv[[0, 1, 3, 4, 5], 5:35, 5:35] = 5
        else:
            sv[0:4, 5:35, 5:35] = 5
        if case_id == "gap":
            sv[[0, 2], 36:40, 36:40] = 6
        image = 100.0 * self.codes[case_id] + np.arange(6, dtype=np.float32)[:, None, None] + np.zeros(label.shape)
        return Volume(case_id, image.astype(np.float32), label, sv)


def _origins(rule, cases, n=3000):
    """``(scan code, first z of the pair)`` of episodes 0..n-1."""
    sampler = EpisodeSampler(_Scans(), cases, EvalGroup("all", ("liver",)), augment=False,
                             min_fg_pixels=200, norm="none", rule=rule)
    origins = []
    for index in range(n):
        support_image, _, query_image, _ = sampler.episode(index)
        low = min(float(support_image[20, 20]), float(query_image[20, 20]))
        origins.append((int(low // 100), int(low % 100)))
    return origins


def _assert_share(hits, n, expected):
    assert abs(hits / n - expected) < 5 * (expected * (1 - expected) / n) ** 0.5, (hits / n, expected)


# The expected shares follow the rule of Q-Net's / SD-FSMIS's training ``__getitem__``
# literally: draw a scan; in it draw a class until it shows in >= 2 kept slices; a class
# without a run of >= 2 consecutive slices starts over with a new scan; otherwise draw a
# run, then the pair's first slice within it (all but the run's last); a pair below the
# size floor draws a new class in the same scan.
@pytest.mark.parametrize("rule, expected", [
    # reference: the scan is kept, so each of the two scans gives half the episodes
    ("reference", 1 / 2),
    # earlier rule: a rejected pair redraws the scan; "small" passes 1 pair in 3, so its
    # share is (1/2 * 1/3) / (1/2 * 1/3 + 1/2) = 1/4
    ("uniform_pairs", 1 / 4),
])
def test_a_rejected_pair_redraws_in_the_same_scan(rule, expected):
    origins = _origins(rule, ["large", "small"])
    _assert_share(sum(scan == 2 for scan, _ in origins), len(origins), expected)
    assert {z for scan, z in origins if scan == 2} == {2}  # only the pair that passes


@pytest.mark.parametrize("rule, expected", [
    # reference: class 6 (slices 0 and 2) sends half of "gap"'s draws to a new scan:
    # per attempt gap 1/4, large 1/2, start over 1/4 -> gap 1/3
    ("reference", 1 / 3),
    ("uniform_pairs", 1 / 2),  # class 6 has no pair, so it is never drawn
])
def test_a_class_without_adjacent_slices_starts_over_with_a_new_scan(rule, expected):
    origins = _origins(rule, ["gap", "large"])
    _assert_share(sum(scan == 3 for scan, _ in origins), len(origins), expected)


@pytest.mark.parametrize("rule, expected", [
    ("reference", 1 / 2),  # a run first (2 runs), then a start within it
    ("uniform_pairs", 1 / 3),  # uniformly among the 3 pairs
])
def test_a_run_is_drawn_before_the_pair_within_it(rule, expected):
    origins = _origins(rule, ["runs"])
    assert {z for _, z in origins} == {0, 3, 4}
    _assert_share(sum(z == 0 for _, z in origins), len(origins), expected)


def test_a_scan_where_no_draw_can_end_is_left_out():
    """The reference would loop forever in "small" under a 500 px floor; it is left out."""
    dataset = _Scans()
    sampler = EpisodeSampler(dataset, ["large", "small"], EvalGroup("all", ("liver",)), augment=False,
                             min_fg_pixels=500, norm="none")
    assert len(sampler.cases) == 1
    with pytest.raises(DataError, match="no training episode"):
        EpisodeSampler(dataset, ["small"], EvalGroup("all", ("liver",)), min_fg_pixels=500, norm="none")


def test_code_form_uses_one_fixed_elastic_field_and_unit_range_gamma():
    """SD-FSMIS's Medical.py: ``np.random.RandomState(2025)`` seeds every elastic transform,
    so all episodes share one deformation; gamma acts on ``(x + 1) / 2`` clamped to [0, 1]."""
    from scipy.ndimage import gaussian_filter

    code = EpisodeAugmenter(form="sdfsmis_code")
    no_affine = EpisodeAugmenter(rotate_deg=0, translate_px=0, scale=(1, 1), shear_deg=0, form="sdfsmis_code")
    grids = [no_affine.grid(32, 40, np.random.default_rng(seed)) for seed in (0, 1)]
    torch.testing.assert_close(grids[0], grids[1])  # the same field whatever the generator
    state = np.random.RandomState(2025)  # Medical.py's elastic_transform, step by step
    dx = gaussian_filter((state.rand(32, 40) * 2 - 1), 5, mode="reflect") * 10
    dy = gaussian_filter((state.rand(32, 40) * 2 - 1), 5, mode="reflect") * 10
    identity = torch.nn.functional.affine_grid(torch.eye(2, 3)[None], [1, 1, 32, 40], align_corners=False)
    pixels = (grids[0] - identity)[0].numpy() * np.array([40 / 2, 32 / 2])
    np.testing.assert_allclose(pixels[..., 0], dx, atol=1e-4)
    np.testing.assert_allclose(pixels[..., 1], dy, atol=1e-4)
    standard = EpisodeAugmenter(rotate_deg=0, translate_px=0, scale=(1, 1), shear_deg=0)
    assert not torch.allclose(standard.grid(32, 40, np.random.default_rng(0)), standard.grid(32, 40, np.random.default_rng(1)))

    image = np.linspace(-1.2, 1.0, 64, dtype=np.float32).reshape(8, 8)
    gamma = code.gamma(image, np.random.default_rng(0))
    exponent = np.random.default_rng(0).uniform(0.5, 1.5)
    np.testing.assert_allclose(gamma, np.clip((image + 1) / 2, 0, 1) ** exponent * 2 - 1, rtol=1e-5, atol=1e-6)


def test_code_form_deforms_the_mask_with_the_generators_next_field_as_the_code_does():
    """Medical.py's ``elastic_transform_pair`` hands one ``RandomState(2025)`` to the image's
    ``elastic_transform`` and then to the mask's: the image takes draws 1-2, its mask 3-4."""
    from scipy.ndimage import gaussian_filter

    height, width = 32, 40
    state = np.random.RandomState(2025)
    fields = [[gaussian_filter((state.rand(height, width) * 2 - 1), 5, mode="reflect") * 10 for _ in range(2)]
              for _ in range(2)]  # image (dx, dy), then mask (dx, dy)
    identity = torch.nn.functional.affine_grid(torch.eye(2, 3)[None], [1, 1, height, width], align_corners=False)
    for form, mask_field in (("sdfsmis_code", fields[1]), ("sdfsmis_code_shared_field", fields[0])):
        augmenter = EpisodeAugmenter(rotate_deg=0, translate_px=0, scale=(1, 1), shear_deg=0, form=form)
        image_grid, mask_grid = augmenter._grids(height, width, np.random.default_rng(0))
        for grid, (dx, dy) in ((image_grid, fields[0]), (mask_grid, mask_field)):
            pixels = (grid - identity)[0].numpy() * np.array([width / 2, height / 2])
            np.testing.assert_allclose(pixels[..., 0], dx, atol=1e-4)
            np.testing.assert_allclose(pixels[..., 1], dy, atol=1e-4)
    # so the warped mask is not the warped image's: a disc's edge moves by up to ~2 px
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2).astype(np.float32)
    own = EpisodeAugmenter(form="sdfsmis_code").geometric(disc, disc > 0, np.random.default_rng(3))
    shared = EpisodeAugmenter(form="sdfsmis_code_shared_field").geometric(disc, disc > 0, np.random.default_rng(3))
    np.testing.assert_array_equal(own[0], shared[0])  # the image's deformation is the same
    assert (own[1] != shared[1]).any() and ((shared[0] > 0.5) == shared[1]).mean() > (((own[0] > 0.5) == own[1]).mean())


def test_code_form_warps_before_gamma():
    sampler = EpisodeSampler(_Stack(), ["1"], EvalGroup("all", ("liver",)), min_fg_pixels=0, seed=0,
                             augment_form="sdfsmis_code")
    order = []

    class _Order(EpisodeAugmenter):
        def gamma(self, image, rng):
            order.append("gamma")
            return image

        def geometric(self, image, mask, rng):
            order.append("geometric")
            return image, mask

    sampler.augmenter = _Order(form="sdfsmis_code")
    sampler.sample()
    assert order == ["geometric", "gamma"]


# -- runs of adjacent slices, as the reference code finds them ------------------------------------
def _reference_subsets(showing: list[int], excluded: list[int]) -> list[list[int]]:
    """Q-Net's / SD-FSMIS's ``__getitem__`` steps, literally: the slices showing the class
    (a numpy array), minus those it shares with the excluded ones, through a Python set;
    then stretches of that list where each slice is the one before it plus one; then only
    stretches of at least two (one shot + one query)."""
    sli_idx = np.arange(64)[np.isin(np.arange(64), showing)]
    sli_idx = list(set(sli_idx) - set(np.intersect1d(sli_idx, np.asarray(excluded, dtype=int))))
    subsets: list[list[int]] = []
    for i in range(len(sli_idx)):
        if not subsets:
            subsets.append([sli_idx[i]])
        elif sli_idx[i - 1] + 1 == sli_idx[i]:
            subsets[-1].append(sli_idx[i])
        else:
            subsets.append([sli_idx[i]])
    return [[int(z) for z in subset] for subset in subsets if len(subset) >= 2]


@pytest.mark.parametrize("showing, excluded", [
    ([2, 3, 4, 5], []),  # below 8 a set iterates sorted: the whole run
    ([7, 8], []),  # iterates [8, 7]: no run at all
    ([30, 31, 32, 33], []),  # [32, 33] and [30, 31]: the pair (31, 32) is never drawn
    (list(range(5, 20)), []),
    (list(range(10, 40)), [20, 21, 35]),  # setting 2's dropped slices inside the range
    (list(range(60, 64)) + list(range(0, 3)), []),
    ([14, 15, 16, 17, 18, 33, 34], [16]),
])
def test_runs_follow_the_reference_codes_set_order_literally(showing, excluded):
    from fsmis_bench.training.episodes import reference_runs

    got = [run.tolist() for run in reference_runs(np.asarray(sorted(showing)), np.asarray(excluded, dtype=int))]
    assert got == _reference_subsets(showing, excluded)


class _Deep(VolumeDataset):
    """One scan of 40 slices: class 5 in slices 30-33 only (900 px each); each voxel holds its z."""

    label_map = {"liver": 1}
    test_organs = ("liver",)

    def _case_ids(self):
        return ["1"]

    def _load(self, case_id, with_supervoxels):
        label = np.zeros((40, 40, 40), dtype=np.int32)
        sv = np.zeros_like(label)
        sv[30:34, 5:35, 5:35] = 5
        image = np.arange(40, dtype=np.float32)[:, None, None] + np.zeros(label.shape, dtype=np.float32)
        return Volume(case_id, image, label, sv)


@pytest.mark.parametrize("runs, starts", [
    ("reference", {30: 1 / 2, 32: 1 / 2}),  # runs [32, 33] and [30, 31]: a run, then its only pair
    ("sorted", {30: 1 / 3, 31: 1 / 3, 32: 1 / 3}),  # one run of three pairs (fsmis-bench before)
])
def test_the_sampler_draws_the_reference_codes_runs(runs, starts):
    sampler = EpisodeSampler(_Deep(), ["1"], EvalGroup("all", ("liver",)), augment=False, min_fg_pixels=200,
                             norm="none", runs=runs)
    n = 2000
    firsts = []
    for index in range(n):
        support_image, _, query_image, _ = sampler.episode(index)
        firsts.append(int(min(support_image[20, 20], query_image[20, 20])))
    assert set(firsts) == set(starts)
    for z, share in starts.items():
        _assert_share(firsts.count(z), n, share)


def test_episode_runs_is_hashed_where_it_applies_and_marks_the_earlier_form():
    from fsmis_bench.config import compose
    from fsmis_bench.records import config_hash, non_standard_options

    default, earlier = compose([]), compose(["protocol.episode_runs=sorted"])
    assert config_hash(default) != config_hash(earlier)
    assert "episode_runs=sorted" in non_standard_options(earlier, False) and not non_standard_options(default, False)
    # a record from before the key existed ran sorted runs: it hashes as `sorted` does
    from omegaconf import OmegaConf

    before = OmegaConf.create(OmegaConf.to_container(earlier))
    del before.protocol["episode_runs"]
    assert config_hash(before) == config_hash(earlier) and "episode_runs=sorted" in non_standard_options(before, False)
    # uniform_pairs draws pairs, not runs: the key does not split its records
    pairs = [compose(["protocol.episode_sampler=uniform_pairs", f"protocol.episode_runs={form}"])
             for form in ("reference", "sorted")]
    assert config_hash(pairs[0]) == config_hash(pairs[1])


class _Slices(VolumeDataset):
    """One scan of six slices whose voxels name their slice (value z): slice 0 shows no
    class, slices 1-5 show class 5 (30 x 30 px), slice 2 also class 8 (10 x 10 px); the liver
    (label 1) lies in slice 3."""

    label_map = {"liver": 1}
    test_organs = ("liver",)

    def _case_ids(self):
        return ["1"]

    def _load(self, case_id, with_supervoxels):
        label = np.zeros((6, 40, 40), dtype=np.int32)
        label[3, 0:4, 0:4] = 1
        sv = np.zeros_like(label)
        sv[1:6, 5:35, 5:35] = 5
        sv[2, 36:40, 0:10] = 8
        image = np.arange(6, dtype=np.float32)[:, None, None] + np.zeros(label.shape, dtype=np.float32)
        return Volume(case_id, image, label, sv)


def _same_slice_draws(group, n=6000):
    sampler = EpisodeSampler(_Slices(), ["1"], group, augment=False, norm="none", rule="same_slice",
                             min_fg_pixels=10_000)  # no floor in this rule: every class passes
    draws = []
    for index in range(n):
        support_image, support_mask, query_image, query_mask = sampler.episode(index)
        # two copies of one slice and one class
        assert np.array_equal(support_image, query_image) and np.array_equal(support_mask, query_mask)
        z = int(support_image[0, 0])
        classes = _Slices().load("1", with_supervoxels=True).supervoxels[z]
        (cls,) = np.unique(classes[support_mask])
        assert np.array_equal(support_mask, classes == cls)
        draws.append((z, int(cls)))
    return draws


def test_same_slice_draws_slices_as_ssl_alpnets_code_does():
    n = 6000
    draws = _same_slice_draws(EvalGroup("all", ("liver",)), n)
    slices = [z for z, _ in draws]
    # uniform over the six slices, but the empty slice 0 hands its draws to slice 1
    assert slices.count(0) == 0
    _assert_share(slices.count(1), n, 2 / 6)
    for z in (2, 3, 4, 5):
        _assert_share(slices.count(z), n, 1 / 6)
    # in slice 2 the class is drawn uniformly between its two
    in_two = [cls for z, cls in draws if z == 2]
    _assert_share(in_two.count(8), len(in_two), 1 / 2)


def test_same_slice_redraws_an_excluded_slice_over_all_but_the_last():
    n = 6000
    slices = [z for z, _ in _same_slice_draws(EvalGroup("liver", ("liver",), ("liver",), "any"), n)]
    # slice 3 (liver) is excluded: its draws go again to U{0..4}, which resolves to slice 1
    # (itself or via empty slice 0) half the time and to 2 or 4 a quarter each, never to 5
    assert slices.count(3) == 0
    _assert_share(slices.count(1), n, 2 / 6 + 1 / 6 * 1 / 2)
    _assert_share(slices.count(2), n, 1 / 6 + 1 / 6 * 1 / 4)
    _assert_share(slices.count(4), n, 1 / 6 + 1 / 6 * 1 / 4)
    _assert_share(slices.count(5), n, 1 / 6)


def test_same_slice_augments_each_copy_on_its_own_and_is_reproducible():
    sampler = EpisodeSampler(_Slices(), ["1"], EvalGroup("all", ("liver",)), norm="none", rule="same_slice")
    differ = 0
    for index in range(20):
        episode = sampler.episode(index)
        assert all(np.array_equal(a, b) for a, b in zip(episode, sampler.episode(index)))
        support_image, support_mask, query_image, query_mask = episode
        differ += not np.array_equal(support_mask, query_mask)
        assert support_mask.dtype == query_mask.dtype == bool  # (class 8 at the edge may be shifted out)
    assert differ >= 18  # two independent affine + elastic draws


def test_same_slice_is_hashed_marked_and_leaves_the_runs_key_out():
    from fsmis_bench.config import compose
    from fsmis_bench.records import config_hash, non_standard_options

    same = [compose(["protocol.episode_sampler=same_slice", f"protocol.episode_runs={form}"])
            for form in ("reference", "sorted")]
    assert config_hash(same[0]) == config_hash(same[1]) != config_hash(compose([]))
    assert non_standard_options(same[1], False) == ["episode_sampler=same_slice"]


class _SlicesAndBlank(_Slices):
    """``_Slices``'s scan 1, and a scan 2 of six slices that show no class."""

    def _case_ids(self):
        return ["1", "2"]

    def _load(self, case_id, with_supervoxels):
        volume = super()._load("1", with_supervoxels)
        if case_id == "2":
            volume.supervoxels[:] = 0
            volume.label[:] = 0
        return Volume(case_id, volume.image, volume.label, volume.supervoxels)


def test_same_slice_keeps_a_scan_without_a_drawable_slice_in_the_table_as_that_code_does():
    sampler = EpisodeSampler(_SlicesAndBlank(), ["1", "2"], EvalGroup("all", ("liver",)), augment=False,
                             norm="none", rule="same_slice")
    assert len(sampler.slice_table) == 12
    n = 6000
    slices = [int(sampler.episode(i)[0][0, 0]) for i in range(n)]
    # scan 2's six slices pass their draws on, the last wrapping to scan 1's empty slice 0,
    # so scan 1's slice 1 takes its own, slice 0's and all six: 8 of 12
    _assert_share(slices.count(1), n, 8 / 12)
    for z in (2, 3, 4, 5):
        _assert_share(slices.count(z), n, 1 / 12)
    with pytest.raises(DataError, match="no training episode can be drawn"):
        EpisodeSampler(_SlicesAndBlank(), ["2"], EvalGroup("all", ("liver",)), rule="same_slice")
