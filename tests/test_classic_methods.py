"""The classic FSMIS methods (SSL-ALPNet, ADNet, Q-Net) and their torchvision-layout encoder.

Each method's distinctive mechanism is checked against a case computed by hand; the
ResNet-101 encoder against torchvision's published architecture facts; the whole methods by
overfitting one real CHAOS episode (a fitting check: it pins no rule). The training losses and
the Q-Net refinement are recomputed by hand from the released code's rules in
tests/test_classic_reference_rules.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmis_bench.api import build_method, compose
from fsmis_bench.errors import FsmisError
from fsmis_bench.method import EpisodeBatch
from fsmis_bench.records import non_standard_options
from fsmis_methods._resnet_encoders import DeepLabV3, ResNet, build_resnet_encoder, file_sha256
from fsmis_methods.adnet import anomaly_scores, foreground_probability
from fsmis_methods.qnet import reconstruction_loss, refine_prototype
from fsmis_methods.ssl_alpnet import class_prototypes, global_prototypes, local_prototypes, prototype_scores

CLASSIC = ("ssl_alpnet", "adnet", "qnet")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- encoder: torchvision's architecture -----------------------------------------------------
# Parameter counts are torchvision's own documented facts: the ``num_params`` metadata of
# DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1 / DeepLabV3_ResNet50_Weights (in
# torchvision/models/segmentation/deeplabv3.py) and of ResNet{18,50,101}_Weights.IMAGENET1K_V1
# (torchvision/models/resnet.py).
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: DeepLabV3(101), 60_996_202),
        (lambda: DeepLabV3(50), 42_004_074),
        (lambda: ResNet(101), 44_549_160),
        (lambda: ResNet(50), 25_557_032),
        (lambda: ResNet(18), 11_689_512),
    ],
    ids=["deeplabv3_resnet101", "deeplabv3_resnet50", "resnet101", "resnet50", "resnet18"],
)
def test_parameter_counts_match_torchvision(build, expected):
    with torch.device("meta"):
        assert n_params(build()) == expected


def test_torchvision_key_names_and_strict_load():
    model = DeepLabV3(101)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # names and shapes of torchvision's deeplabv3_resnet101 (IntermediateLayerGetter backbone,
    # DeepLabHead = ASPP + conv/bn/relu + conv, FCNHead on layer3)
    for key, shape in {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer3.22.conv2.weight": (256, 256, 3, 3),
        "backbone.layer4.2.bn3.running_var": (2048,),
        "classifier.0.convs.0.0.weight": (256, 2048, 1, 1),
        "classifier.0.convs.3.0.weight": (256, 2048, 3, 3),
        "classifier.0.convs.4.1.weight": (256, 2048, 1, 1),
        "classifier.0.project.0.weight": (256, 1280, 1, 1),
        "classifier.1.weight": (256, 256, 3, 3),
        "classifier.4.bias": (21,),
        "aux_classifier.0.weight": (256, 1024, 3, 3),
        "aux_classifier.4.weight": (21, 256, 1, 1),
    }.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith(("backbone.fc", "backbone.avgpool")) for k in shapes)
    # dilation: output stride 8, layer4 dilated by 4 (DeepLabv3), by 1 with Q-Net's layout
    assert model.backbone.layer4[1].conv2.dilation == (4, 4) and model.backbone.layer2[0].conv2.stride == (2, 2)
    qnet = ResNet(101, (True, True, False))
    assert qnet.layer3[1].conv2.dilation == (4, 4) and qnet.layer4[0].conv2.stride == (2, 2)
    # a state dict with these names loads strictly into a freshly built model
    torch.manual_seed(1)
    other = DeepLabV3(101)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other.backbone.layer4[2].conv3.weight, model.backbone.layer4[2].conv3.weight)


def _write_checkpoint(folder: Path, stem: str, state: dict) -> Path:
    """Save like torchvision names its files: ``<stem>-<first 8 hex of sha256>.pth``."""
    raw = folder / f"{stem}.pth"
    torch.save(state, raw)
    named = folder / f"{stem}-{file_sha256(raw)[:8]}.pth"
    raw.rename(named)
    return named


def test_checkpoint_file_loads_with_identity_and_hash_check(tmp_path):
    torch.manual_seed(3)
    reference = ResNet(18)
    path = _write_checkpoint(tmp_path, "resnet18", reference.state_dict())
    built = build_resnet_encoder("resnet18", "imagenet", pretrained=True, dilation=(False, True, True), with_fc=False, source=str(path))
    assert built.init == "imagenet" and built.weights.sha256 == file_sha256(path)
    assert torch.equal(built.resnet.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert not hasattr(built.resnet, "fc")
    # a method reports the file as its weight identity
    method = build_method(["method=adnet", "method.encoder=resnet18", "method.init=imagenet", f"method.encoder_source={path}"])
    assert method.weight_identity() == {"encoder": {"source": str(path.resolve()), "digest": f"sha256:{file_sha256(path)}"}}
    assert not method.uses_random_weights()
    # a file whose content does not match torchvision's hash prefix in its name
    wrong = tmp_path / "resnet18-00000000.pth"
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(FsmisError, match="damaged or not the released file"):
        build_resnet_encoder("resnet18", "imagenet", pretrained=True, dilation=(False, False, False), with_fc=True, source=str(wrong))
    # a checkpoint of another architecture: one clear error, not a key dump
    bad = _write_checkpoint(tmp_path, "other", {"conv1.weight": torch.zeros(1)})
    with pytest.raises(FsmisError, match="does not fit the architecture"):
        build_resnet_encoder("resnet18", "imagenet", pretrained=True, dilation=(False, False, False), with_fc=True, source=str(bad))


class _RunsCode:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_an_encoder_file_with_code_in_it_is_refused_as_such_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil_resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(FsmisError) as error:
        build_resnet_encoder("resnet18", "imagenet", pretrained=True, dilation=(False, False, False), with_fc=True,
                             source=str(evil))
    assert "holds non-tensor Python objects (posix.system), so it was refused" in error.value.message
    assert "nothing in the file was run" in error.value.message and "\n" not in error.value.message
    assert not marker.exists()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(_write_checkpoint(tmp_path, "whole", ResNet(18).state_dict()).read_bytes()[:5000])
    with pytest.raises(FsmisError, match="truncated or not a torch checkpoint"):
        build_resnet_encoder("resnet18", "imagenet", pretrained=True, dilation=(False, False, False), with_fc=True,
                             source=str(truncated))


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr("fsmis_methods._resnet_encoders._host_answers", lambda url, timeout=1.5: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FsmisError) as info:
        build_method(["method=ssl_alpnet", f"weights_root={tmp_path}"])
    assert "deeplabv3_resnet101_coco-586e9e4e.pth" in info.value.message
    assert "pretrained=false" in info.value.hint and "download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth" in info.value.hint


@pytest.mark.parametrize("name", CLASSIC)
def test_describe_counts_the_resnet101_encoder(name):
    from fsmis_methods._describe import describe_report

    with torch.device("meta"):
        method = build_method([f"method={name}", "pretrained=false"])
    report = describe_report(method)
    rows = {r["component"]: r for r in report["components"]}
    backbone_params = 44_549_160 - (2048 * 1000 + 1000)  # torchvision ResNet-101 without fc
    if name == "qnet":  # Q-Net keeps fc: it feeds the threshold head
        assert rows["encoder.backbone"]["params"] == 44_549_160
        assert rows["encoder.reduce1d"]["params"] == 1001
        assert report["total_params"] == 44_549_160 + 1024 * 512 + 2048 * 512 + 1001
    else:
        assert rows["encoder.backbone"]["params"] == backbone_params
        assert rows["encoder.localconv"]["params"] == 2048 * 256
        assert report["total_params"] == backbone_params + 2048 * 256 + (1 if name == "adnet" else 0)
    assert report["random_weights"] and rows["encoder.backbone"]["random_weights"]


# -- records: reduced budget, smaller encoder and random weights are marked ------------------
def test_departures_from_the_published_configuration_are_marked():
    standard = compose(["method=adnet"])
    assert non_standard_options(standard, False) == []
    reduced = compose(["method=qnet", "train.steps=300", "train.image_size=128", "method.encoder=resnet18", "method.refine_iterations=0"])
    assert non_standard_options(reduced, True) == [
        "method.encoder=resnet18", "method.refine_iterations=0", "train.steps=300", "train.image_size=128", "random_weights",
    ]


@pytest.mark.parametrize(
    ("overrides", "marks"),
    [
        # the training episodes every reference draws (PROTOCOL.md §5), for any method
        (["method=adnet", "train.augment=false"], ["augment=false"]),
        (["method=prototype", "protocol.min_fg_pixels=0"], ["min_fg_pixels=0"]),
        # the mechanics and recipe of each reference, beyond its budget
        (["method=adnet", "method.align_weight=0", "method.threshold_loss_weight=0", "method.bg_weight=1.0"],
         ["method.bg_weight=1.0", "method.threshold_loss_weight=0", "method.align_weight=0"]),
        (["method=adnet", "train.momentum=0", "train.lr_step_every=500", "train.grad_clip=1.0"],
         ["train.momentum=0", "train.lr_step_every=500", "train.grad_clip=1.0"]),
        (["method=adnet", "method.init=imagenet"], ["method.init=imagenet"]),
        (["method=adnet"], []),
        (["method=adnet", "method.init=coco"], []),  # what null means: the same run
        (["method=qnet", "method.path_weight=0.5"], ["method.path_weight=0.5"]),
        (["method=ssl_alpnet", "method.pool_window_test=4", "method.class_weights=[1,1]", "method.threshold=0.5"],
         ["method.threshold=0.5", "method.pool_window_test=4", "method.class_weights=[1, 1]"]),
        (["method=ssl_alpnet", "method.class_weights=[0.05,1.0]"], []),
        (["method=sdfsmis", "method.qe_tau=0.5"], ["method.qe_tau=0.5"]),
    ],
    ids=["augment", "min-fg", "adnet-losses", "adnet-optimiser", "adnet-imagenet", "adnet-default", "adnet-coco", "qnet-alpha",
         "alpnet-mechanics", "alpnet-same-weights", "sdfsmis-tau"],
)
def test_a_changed_reference_mechanic_is_marked(overrides, marks):
    """Each of these changes the reference's numbers: a report must not show the run as standard."""
    cfg = compose(overrides)
    assert non_standard_options(cfg, False) == marks
    # a report recomputes the published-setup marks from the run's config.yaml: the same ones
    from omegaconf import OmegaConf

    from fsmis_bench.records import published_config_deviations
    from fsmis_bench.reporting.collect import published_deviations

    as_saved = OmegaConf.to_container(cfg, resolve=True)
    assert published_deviations(str(cfg.method.name), as_saved) == published_config_deviations(cfg)


def test_episode_options_are_not_marked_for_a_method_that_trains_nothing():
    cfg = compose(["method=support_copy", "protocol.min_fg_pixels=10", "train.augment=false"])
    assert non_standard_options(cfg, False) == []


@pytest.mark.parametrize(("name", "overrides", "resolved"), [
    ("adnet", [], {"init": "coco"}),
    ("qnet", [], {"path_weight": 0.9}),
    ("qnet", ["setting=2"], {"path_weight": 0.6}),
])
def test_run_records_the_options_the_method_resolved(name, overrides, resolved):
    method = build_method([f"method={name}", "pretrained=false", "method.encoder=resnet18", *overrides])
    options = method.resolved_options()
    assert {key: options[key] for key in resolved} == resolved
    assert options["encoder"] == "resnet18"  # the options the method does not resolve stay as composed


# -- SSL-ALPNet: adaptive local prototypes ---------------------------------------------------
def _feature_map() -> tuple[torch.Tensor, torch.Tensor]:
    """Channel 0 = 0..15 row-major on a 4 x 4 grid, channel 1 = 1; mask: the top-left 2 x 2
    window fully, the top-right window 3 of 4 pixels, nothing below."""
    features = torch.stack([torch.arange(16.0).view(4, 4), torch.ones(4, 4)])[None]
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0:2, 0:2] = 1
    mask[0, 0, 0, 2] = mask[0, 0, 0, 3] = mask[0, 0, 1, 2] = 1
    return features, mask


def test_alp_local_prototypes_on_a_known_feature_map():
    features, mask = _feature_map()
    # 2 x 2 windows: top-left mean (0+1+4+5)/4 = 2.5 (mask 1.0); top-right (2+3+6+7)/4 = 4.5 (mask 0.75)
    assert local_prototypes(features, mask, 2, 0.95).tolist() == [[2.5, 1.0]]
    assert local_prototypes(features, mask, 2, 0.7).tolist() == [[2.5, 1.0], [4.5, 1.0]]
    assert local_prototypes(features, 1 - mask, 2, 0.95).tolist() == [[10.5, 1.0], [12.5, 1.0]]
    # global: (0+1+4+5 + 2+3+6)/7 = 3
    torch.testing.assert_close(global_prototypes(features, mask), torch.tensor([[3.0, 1.0 * 7 / (7 + 1e-5)]]))
    # foreground: no 4 x 4 window reaches 0.95 (7/16), so the global prototype alone
    torch.testing.assert_close(class_prototypes(features, mask, 2, 0.95, with_global=True), global_prototypes(features, mask))
    # a full mask passes the gate: local + global
    full = torch.ones(1, 1, 4, 4)
    protos = class_prototypes(features, full, 2, 0.95, with_global=True)
    assert protos.shape == (5, 2) and protos[:4, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_alp_score_is_a_softmax_weighted_similarity():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # positions (1, 0) and (1, 1)
    scores = prototype_scores(query, prototypes, scale=20.0)[0, 0]
    # (1, 0): cosines 1 and 0 -> d = (20, 0) -> 20 e^20 / (e^20 + 1)
    assert scores[0].item() == pytest.approx(20 * math.exp(20) / (math.exp(20) + 1))
    # (1, 1): both cosines 1/sqrt(2) -> 20 / sqrt(2)
    assert scores[1].item() == pytest.approx(20 / math.sqrt(2), rel=1e-5)
    assert prototype_scores(query, prototypes[:1])[0, 0, 1].item() == pytest.approx(20 / math.sqrt(2), rel=1e-5)


# -- ADNet: thresholded anomaly score --------------------------------------------------------
def test_adnet_thresholded_anomaly_score():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # positions (1, 0), (0, 1)
    prototype = torch.tensor([[3.0, 0.0]])
    scores = anomaly_scores(features, prototype, scale=20.0)
    assert scores.flatten().tolist() == [-20.0, 0.0]
    p = foreground_probability(scores, torch.tensor(-10.0), steepness=0.5).flatten()
    # 1 - sigmoid(0.5 (-20 + 10)) = 1 - sigmoid(-5); 1 - sigmoid(5)
    assert p.tolist() == pytest.approx([1 - 1 / (1 + math.exp(5)), 1 - 1 / (1 + math.exp(-5))], rel=1e-5)
    # the method's T is a parameter starting at -10, and its threshold loss is T / 20
    torch.manual_seed(0)
    method = build_method(["method=adnet", "pretrained=false", "method.encoder=resnet18", "method.align_weight=0"])
    assert method.threshold.item() == -10.0
    batch = _random_batch(32)
    with torch.no_grad():
        method.train()
        torch.manual_seed(1)
        with_t = method.training_loss(batch)
        method.options = type(method.options)(**{**method.options.__dict__, "threshold_loss_weight": 0.0})
        torch.manual_seed(1)
        without_t = method.training_loss(batch)
    assert (with_t - without_t).item() == pytest.approx(-10.0 / 20.0, abs=1e-5)


def _random_batch(size: int) -> EpisodeBatch:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : size * 3 // 4, size // 4 : size * 3 // 4] = 1
    return EpisodeBatch(torch.randn(1, 1, 1, size, size, generator=g), mask[None], torch.randn(1, 1, size, size, generator=g), mask)


# the alignment loss (its skipped episodes included) and the whole training loss are recomputed
# by hand from the released code in tests/test_classic_reference_rules.py


# -- Q-Net: query-informed threshold, prototype refinement ----------------------------------------
def test_qnet_threshold_is_read_from_the_query():
    method = build_method(["method=qnet", "pretrained=false", "method.encoder=resnet18"])
    encoder = method.encoder
    with torch.no_grad():
        encoder.backbone.fc.weight.zero_()
        encoder.backbone.fc.bias.zero_()
        encoder.backbone.fc.weight[0, 3] = 2.0
        encoder.backbone.fc.bias[0] = 1.0
        encoder.reduce1d.weight.zero_()
        encoder.reduce1d.weight[0, 0] = -1.5
        encoder.reduce1d.bias.fill_(0.5)
        # channel c of layer4 is the constant c -> GAP = c -> fc[0] = 2 * 3 + 1 = 7 -> T = -1.5 * 7 + 0.5
        layer4 = torch.arange(512.0).view(1, 512, 1, 1).expand(2, 512, 2, 2).clone()
        layer4[1] *= 2  # another query: fc[0] = 13 -> T = -19
        assert encoder.threshold(layer4).flatten().tolist() == [-10.0, -19.0]
    # the setting picks alpha as the README says
    assert method.options.path_weights == (0.9, pytest.approx(0.1))
    assert build_method(["method=qnet", "pretrained=false", "method.encoder=resnet18", "setting=2"]).options.path_weight == 0.6


def test_qnet_refinement_objective_and_steps():
    # features (0, 2), foreground = second position, prototype 1 -> rebuilt (0, 1);
    # both min-max normalise to (0, 1): input = target = sigmoid((0, 1)) (the entropy; a case
    # with input != target is in tests/test_classic_reference_rules.py)
    features = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    foreground = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    a, b = 0.5, 1 / (1 + math.exp(-1))
    expected = -((a * math.log(a) + (1 - a) * math.log(1 - a)) + (b * math.log(b) + (1 - b) * math.log(1 - b))) / 2
    assert reconstruction_loss(features, torch.tensor([[1.0]]), foreground).item() == pytest.approx(expected, rel=1e-6)
    # the refinement's Adam steps lower that objective; foreground (cos ~ 1) and background
    # (cos ~ 0) are far from the decision cos = 0.5 (T = -10), so the mask stays fixed
    torch.manual_seed(0)
    features = 0.05 * torch.randn(1, 4, 6, 6) + torch.tensor([0.0, 0.0, 2.0, 1.0])[:, None, None]
    features[..., :3, :3] += torch.tensor([2.0, 1.0, -2.0, -1.0])[:, None, None]
    prototype = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    threshold = torch.tensor(-10.0)
    fixed = (foreground_probability(anomaly_scores(features, prototype), threshold) > 0.5).unsqueeze(1).float()
    refined = refine_prototype(features, prototype, threshold, iterations=7, lr=0.01)
    assert refined.shape == (1, 4) and not refined.requires_grad
    still = (foreground_probability(anomaly_scores(features, refined), threshold) > 0.5).unsqueeze(1).float()
    assert torch.equal(still, fixed) and fixed.sum() > 0
    assert reconstruction_loss(features, refined, fixed) < reconstruction_loss(features, prototype, fixed)
    assert torch.equal(refine_prototype(features, prototype, threshold, iterations=0), prototype)
    # input and target told apart, and several queries at once, each with its own T, by hand:
    # tests/test_classic_reference_rules.py


# -- a real episode: each method fits it -----------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("name", CLASSIC)
def test_overfits_one_real_chaos_episode(name, real_data_root):
    from fsmis_bench.api import load_dataset
    from fsmis_bench.data.base import normalise_volume
    from fsmis_bench.training.episodes import resize_slices

    dataset = load_dataset("abd_mri", real_data_root)
    volume = dataset.load(dataset.case_ids()[0], with_supervoxels=False)
    liver = volume.label == dataset.label_map["liver"]
    z = int(np.argmax(liver.sum((1, 2))))
    image = normalise_volume(volume.image, "zscore")
    size = 64
    slices = resize_slices(torch.from_numpy(image[z : z + 2].copy()), size)
    masks = resize_slices(torch.from_numpy(liver[z : z + 2].astype(np.float32)), size, nearest=True)
    batch = EpisodeBatch(slices[0][None, None, None], masks[0][None, None, None], slices[1][None, None], masks[1][None, None])
    truth = batch.query_masks[0, 0] > 0.5

    def dice() -> float:
        method.eval()
        predicted = method.predict(batch.support_images[0], batch.support_masks[0], batch.query_images)[0]
        method.train()
        return 2 * (predicted & truth).sum().item() / (predicted.sum().item() + truth.sum().item())

    torch.manual_seed(0)
    method = build_method([f"method={name}", "pretrained=false", "method.encoder=resnet18", "dataset=abd_mri"])
    optimizer = torch.optim.Adam([p for g in method.param_groups() for p in g["params"]], lr=1e-3)
    untrained = dice()
    losses = []
    for _ in range(25):  # the methods' own losses, Adam for speed (this tests fitting, not the recipe)
        loss = method(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    trained = dice()
    assert losses[-1] < losses[0] - 0.5
    # (random conv features already match adjacent slices a little: ALP starts near 0.8 here)
    assert trained > 0.7 and trained >= untrained, (losses[::5], untrained, trained)


# -- the engine's SGD + step decay, as the classic methods' MultiStepLR ----------------------
def test_step_schedule_matches_multisteplr_and_sgd_is_built():
    from omegaconf import OmegaConf

    from fsmis_bench.training.engine import _schedule, make_optimizer

    total, every, gamma = 5000, 1000, 0.95
    factor = _schedule("step", total, 0, every, gamma)
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=1.0)
    # the references' milestones: [(k + 1) * 1000 for k in range(n_steps // 1000 - 1)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(reference, milestones=[(k + 1) * every for k in range(total // every - 1)], gamma=gamma)
    for step in range(total + 500):
        assert factor(step) == pytest.approx(reference.param_groups[0]["lr"]), step
        reference.step()
        scheduler.step()
    assert factor(total + 10_000) == pytest.approx(gamma**4)
    tcfg = OmegaConf.create({"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4})
    optimizer = make_optimizer([{"name": "all", "params": [param], "lr": 1e-3}], tcfg)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 5e-4
