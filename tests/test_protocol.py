"""EP1 protocol pinned against hand-computed cases (PROTOCOL.md §2–§4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fsmis_bench.data.base import Volume, VolumeDataset
from fsmis_bench.errors import ConfigError, DataError, DataWarning
from fsmis_bench.protocol import (
    FOLDS, build_test_episodes, chunk_edges, confusion_counts, dice_from_counts, eval_groups,
    excluded_slices, fold_indices, fold_organ_scores, support_positions,
)
from fsmis_bench.protocol.ep1 import support_case_positions


# PROTOCOL.md §2, written out literally as the reference code (ADNet, Q-Net, SD-FSMIS
# ``get_folds``) writes them: sets of indices into the id-sorted scan list.
REFERENCE_FOLDS = {
    "abd_mri": (20, [set(range(0, 5)), set(range(4, 9)), set(range(8, 13)), set(range(12, 17)), {0} | set(range(16, 20))]),
    "abd_ct": (30, [set(range(0, 7)), set(range(6, 13)), set(range(12, 19)), set(range(18, 25)), {0} | set(range(24, 30))]),
    "card_mri": (35, [set(range(0, 8)), set(range(7, 15)), set(range(14, 22)), set(range(21, 29)), {0} | set(range(28, 35))]),
}


@pytest.mark.parametrize("dataset", sorted(REFERENCE_FOLDS))
@pytest.mark.parametrize("fold", range(5))
def test_fold_members_and_order_follow_the_reference_rule(dataset, fold):
    n_scans, reference = REFERENCE_FOLDS[dataset]
    sorted_scans = [f"scan{i:02d}" for i in range(n_scans)]  # stands for the id-sorted file list
    # the reference rule, literally
    expected = [elem for idx, elem in enumerate(sorted_scans) if idx in reference[fold]]
    ours = [sorted_scans[i] for i in fold_indices(FOLDS[dataset], fold, n_scans, dataset)]
    assert ours == expected


@pytest.mark.parametrize(
    "dataset, support",
    [("abd_mri", 17), ("abd_ct", 25), ("card_mri", 29)],  # PROTOCOL.md §2 / issue 8
)
def test_fold4_support_is_the_reference_scan(dataset, support):
    indices = fold_indices(FOLDS[dataset], 4, REFERENCE_FOLDS[dataset][0], dataset)
    assert indices[0] == 0 and indices[2] == support


def test_a_fold_is_a_set_whatever_order_it_is_written_in():
    assert fold_indices(((3, 0, 2),), 0, 5) == (0, 2, 3)


def test_every_scan_is_tested_and_folds_overlap_by_one():
    for name, n in (("abd_mri", 20), ("abd_ct", 30), ("card_mri", 35)):
        folds = FOLDS[name]
        assert set().union(*folds) == set(range(n))
        for a, b in zip(folds, folds[1:] + folds[:1]):
            assert len(set(a) & set(b)) == 1


@pytest.mark.parametrize("fold", [-1, 5, 7])
def test_bad_fold_is_a_clear_error(fold):
    with pytest.raises(ConfigError, match="fold"):
        fold_indices(FOLDS["abd_mri"], fold, 20, "abd_mri")


def test_fold_needing_missing_scans_is_a_clear_error():
    with pytest.raises(ConfigError, match="only 10 scans"):
        fold_indices(FOLDS["abd_mri"], 3, 10, "abd_mri")


@pytest.mark.parametrize(
    "n_labelled, n_part, expected",
    [
        (12, 3, [2, 6, 10]),  # p = 1/6, 1/2, 5/6 -> int(2.0), int(6.0), int(10.0)
        (10, 3, [1, 5, 8]),  # int(1.67), int(5.0), int(8.33)
        (7, 3, [1, 3, 5]),  # int(1.17), int(3.5), int(5.83)
        (3, 3, [0, 1, 2]),
        (9, 1, [4]),  # n = 1: p = 0.5
        (20, 5, [2, 6, 10, 14, 18]),  # p = 0.1, 0.3, 0.5, 0.7, 0.9
    ],
)
def test_support_positions(n_labelled, n_part, expected):
    assert support_positions(n_labelled, n_part) == expected


def _reference_support_index(n_shot: int, count: int) -> list[int]:
    """Q-Net's ``TestDataset.get_support_index``, written out step by step as it is there."""
    if n_shot == 1:
        pcts = [0.5]
    else:
        half_part = 1 / (n_shot * 2)
        part_interval = (1.0 - 1.0 / n_shot) / (n_shot - 1)
        pcts = [half_part + part_interval * ii for ii in range(n_shot)]
    return (np.array(pcts) * count).astype("int").tolist()


def test_support_positions_follow_the_reference_rounding():
    # a reassociated formula rounds differently for some n_part >= 11 (n_part=11, 12 slices)
    for n_part in range(1, 26):
        for n_labelled in range(n_part, 400):
            assert support_positions(n_labelled, n_part) == _reference_support_index(n_part, n_labelled), (
                n_labelled, n_part)


@pytest.mark.parametrize(
    "n_query, n_part, expected",
    [
        (12, 3, [0, 4, 8, 12]),
        (10, 3, [0, 3, 6, 10]),  # linspace 0, 3.33, 6.67, 10
        (2, 3, [0, 0, 1, 2]),  # first chunk empty
        (7, 1, [0, 7]),
    ],
)
def test_chunk_edges(n_query, n_part, expected):
    assert chunk_edges(n_query, n_part) == expected


@pytest.mark.parametrize(
    "fold_size, supp_idx, n_shot, expected",
    [(5, 2, 1, [2]), (5, -1, 1, [4]), (8, 3, 1, [3]), (5, 4, 2, [4, 0])],
)
def test_support_case_positions(fold_size, supp_idx, n_shot, expected):
    assert support_case_positions(fold_size, supp_idx, n_shot) == expected


def test_support_index_outside_fold_is_a_clear_error():
    with pytest.raises(ConfigError, match="supp_idx"):
        support_case_positions(5, 5, 1)


class _Toy(VolumeDataset):
    """Five 10-slice scans; organ 1 in hand-chosen slices."""

    label_map = {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4}
    test_organs = ("liver", "spleen", "left_kidney", "right_kidney")
    setting2_groups = (("liver", "spleen"), ("left_kidney", "right_kidney"))
    folds = ((0, 1, 2, 3, 4),) * 5
    liver_slices = {"a": [2, 3, 4], "b": [1, 2, 3, 4, 5, 6], "c": [3, 4, 5, 6, 7, 8], "d": [], "e": [0, 9]}

    def _case_ids(self):
        return list("abcde")

    def _load(self, case_id, with_supervoxels):
        label = np.zeros((10, 4, 4), dtype=np.int32)
        for z in self.liver_slices[case_id]:
            label[z, 1:3, 1:3] = 1
        image = np.arange(160, dtype=np.float32).reshape(10, 4, 4)
        return Volume(case_id, image, label)


def test_test_episodes_follow_ep1():
    dataset = _Toy()
    with pytest.warns(DataWarning, match="query scan d shows no liver, so it is left out"):
        support, queries = build_test_episodes(dataset, list("abcde"), "liver", supp_idx=2, n_part=3)
    assert support.case_ids == ["c"]
    # c's labelled slices 3..8 (C = 6): positions int(6/6)=1, int(3)=3, int(5)=5 -> z 4, 6, 8
    assert support.slice_indices[:, 0].tolist() == [4, 6, 8]
    # d has no liver and is skipped; the support c is not a query
    assert [q.case_id for q in queries] == ["a", "b", "e"]
    b = queries[1]
    assert b.slice_indices.tolist() == [1, 2, 3, 4, 5, 6]
    assert b.edges == [0, 2, 4, 6]
    assert b.images.shape == (6, 4, 4) and b.masks.any(axis=(1, 2)).all()
    assert b.masks[:, 1:3, 1:3].all() and b.masks.sum() == 6 * 4  # exactly the liver, binarised


def test_support_without_the_organ_is_a_clear_error():
    dataset = _Toy()
    with pytest.raises(DataError, match="support scan d shows liver in 0 slices"):
        build_test_episodes(dataset, list("abcde"), "liver", supp_idx=3, n_part=3)


@pytest.mark.filterwarnings("ignore:_Toy. query scan d shows no liver")
def test_support_with_fewer_slices_than_chunks_shares_them_as_the_reference_does():
    dataset = _Toy()  # c shows the liver in z 3..8 (C = 6)
    with pytest.warns(DataWarning, match="fewer than n_part=8: chunks share support slices"):
        support, _ = build_test_episodes(dataset, list("abcde"), "liver", supp_idx=2, n_part=8)
    expected = [3 + k for k in _reference_support_index(8, 6)]
    assert support.slice_indices[:, 0].tolist() == expected and len(set(expected)) < 8


def test_confusion_and_dice_by_hand():
    pred = np.array([[1, 1, 0, 0]], dtype=bool)
    truth = np.array([[1, 0, 1, 0]], dtype=bool)
    assert confusion_counts(pred, truth) == (1, 1, 1)
    assert dice_from_counts(1, 1, 1) == pytest.approx(2 / 4)
    assert dice_from_counts(0, 0, 0) == 1.0
    assert dice_from_counts(0, 3, 0) == 0.0


@pytest.mark.parametrize("fill", [0.0, 0.02, 0.3, 0.9])
def test_volume_dice_agrees_with_monai(fill):
    """An implementation no one here wrote: MONAI's Dice of the same volumes (empty pair = 1,
    as MONAI's ``ignore_empty=False``)."""
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(int(fill * 100))
    for _ in range(5):
        pred, truth = rng.random((2, 7, 24, 24)) < fill
        ours = dice_from_counts(*confusion_counts(pred, truth))
        theirs = compute_dice(torch.from_numpy(pred)[None, None].double(), torch.from_numpy(truth)[None, None].double(),
                              ignore_empty=False)
        assert ours == pytest.approx(float(theirs), rel=1e-6)  # MONAI computes in float32


def test_per_volume_and_pooled_dice_differ_as_computed_by_hand():
    cases = pd.DataFrame(
        {
            "method": "m", "dataset": "d", "setting": 1, "fold": 0, "organ": "liver",
            "case_id": ["1", "2"],
            # case 1: TP 90 FP 10 FN 0 -> 180/190; case 2: TP 1 FP 0 FN 9 -> 2/11
            "tp": [90, 1], "fp": [10, 0], "fn": [0, 9],
        }
    )
    cases["dice"] = [180 / 190, 2 / 11]
    per_volume = fold_organ_scores(cases, "per_volume")["dice"].item()
    pooled = fold_organ_scores(cases, "pooled")["dice"].item()
    assert per_volume == pytest.approx((180 / 190 + 2 / 11) / 2)
    assert pooled == pytest.approx(2 * 91 / (2 * 91 + 10 + 9))
    with pytest.raises(ConfigError):
        fold_organ_scores(cases, "mean")


def test_exclusion_forms():
    label = np.zeros((5, 2, 2), dtype=np.int32)
    label[0, 0, 0] = 1  # liver only
    label[1, 0, 0], label[1, 0, 1] = 1, 4  # liver + spleen
    label[2] = [[1, 2], [3, 4]]  # all four
    label[3, 1, 1] = 2  # right kidney only
    values = [1, 4, 3, 2]
    assert excluded_slices(label, [1, 4], "any").tolist() == [True, True, True, False, False]
    assert excluded_slices(label, values, "all").tolist() == [False, False, True, False, False]
    assert excluded_slices(label, values, "none").tolist() == [False] * 5
    with pytest.raises(ConfigError):
        excluded_slices(label, values, "some")


def test_eval_groups_per_setting():
    toy = _Toy()
    (one,) = eval_groups(toy, toy, 1)
    assert one.organs == toy.test_organs and one.exclusion == "none"
    any_groups = eval_groups(toy, toy, 2, "any")
    assert [g.organs for g in any_groups] == [("liver", "spleen"), ("left_kidney", "right_kidney")]
    assert all(g.exclusion == "any" and g.excluded_organs == g.organs for g in any_groups)
    (legacy,) = eval_groups(toy, toy, 2, "all")
    assert legacy.exclusion == "all" and set(legacy.excluded_organs) == set(toy.test_organs)
    gt = eval_groups(toy, toy, 1, "any", "gt")
    assert gt[0].train_organs == ("left_kidney", "right_kidney") and gt[0].exclusion == "none"
    with pytest.raises(ConfigError):
        eval_groups(toy, toy, 3)


class _ToyWithOtherOrgans(_Toy):
    label_map = {**_Toy.label_map, "stomach": 7}


@pytest.mark.parametrize(
    "setting, exclusion, expected",
    [
        # train_labels=gt, per group (correct): a group's test organs are never trained on
        (1, "any", [(("liver", "spleen"), ("left_kidney", "right_kidney", "stomach")),
                    (("left_kidney", "right_kidney"), ("liver", "spleen", "stomach"))]),
        (2, "all", [(("liver", "spleen", "left_kidney", "right_kidney"), ("stomach",))]),
    ],
)
def test_gt_training_organs_per_group(setting, exclusion, expected):
    toy = _ToyWithOtherOrgans()
    groups = eval_groups(toy, toy, setting, exclusion, "gt", "per_group")
    assert [(g.organs, g.train_organs) for g in groups] == expected
    for g in groups:
        assert not set(g.organs) & set(g.train_organs)


@pytest.mark.parametrize("setting, exclusion, n_groups", [(1, "any", 1), (2, "all", 1), (2, "any", 2)])
def test_gt_exclusion_as_shipped_removes_only_liver_and_spleen(setting, exclusion, n_groups):
    """``--test_label 1``: one model trained on everything but liver and spleen, tested on all
    four organs, so the kidneys leak (PROTOCOL.md §4)."""
    toy = _ToyWithOtherOrgans()
    groups = eval_groups(toy, toy, setting, exclusion, "gt", "liver_spleen")
    assert len(groups) == n_groups
    assert {o for g in groups for o in g.organs} == set(toy.test_organs)
    for g in groups:
        assert g.train_organs == ("left_kidney", "right_kidney", "stomach")
    with pytest.raises(ConfigError, match="gt_exclusion"):
        eval_groups(toy, toy, 1, "any", "gt", "kidneys")
