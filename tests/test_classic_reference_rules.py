"""The classic baselines' losses and refinement, recomputed by hand from the released code's rules.

Each test builds a small deterministic case, replaces the ResNet encoder by a module that
returns hand-set feature maps (so nothing random is involved), and repeats the released
code's arithmetic step by step in float64 with plain tensor arithmetic: no function of
``fsmis_methods`` is used for the expected values. The rules and where they come from:

* ADNet, ``sha168/ADNet`` ``models/fewshot_anom.py``: ``getFeatures`` (l.108-123, features
  upsampled bilinearly with the default ``align_corners=False`` to the mask, masked average
  with ``+ 1e-5``), ``negSim``/``getPred`` (``1 - sigmoid(0.5 (-20 cos - T))``), the query
  prediction upsampled with ``align_corners=True`` (l.77), ``alignLoss`` (l.142-177: the
  query prediction's argmax *on the feature grid* gives the query prototype as a masked
  average on that grid, l.146-151; the support prediction upsampled with ``align_corners=True``,
  l.164; unweighted NLL of the clamped probabilities; an empty prediction is skipped);
  ``main_train.py`` l.75-76 and 144-146: NLL class weights ``[bg_wt = 0.1, 1]``, loss = query
  + align + ``T / 20``.
* Q-Net, ``shenqq377/Q-Net`` ``models/fewshot.py``: the threshold of the query (l.61-62,
  also in ``alignLoss`` l.227), the two paths upsampled with ``align_corners=True`` and
  averaged with ``alpha = (0.9, 0.1)`` (l.102-105, 229-235), the alignment prototype from
  the full-resolution combined prediction through ``getFeatures`` (l.210-224), and the
  refinement ``updatePrototype`` (l.121-154): BCE with the sigmoid of the min-max normalised
  *original* features as input and of the *rebuilt* features as target (l.139-142), Adam
  lr 0.01; ``train.py`` l.65-66: NLL class weights ``[0.1, 1]``.
* SSL-ALPNet, ``cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation``:
  ``util/utils.py`` ``compose_wt_simple`` l.81-91 and ``training.py`` l.105-106 (weighted CE,
  ``[0.05, 1]``: background 0.05), ``models/alpmodule.py`` (``gridconv`` / ``gridconv+`` /
  ``mask`` prototypes: windows whose pooled mask exceeds 0.95; ``safe_norm`` eps 1e-4;
  ``sum softmax(d) d`` with ``d = 20 cos``), ``models/grid_proto_fewshot.py`` (masks resized
  bilinearly to the feature grid, l.125-126; the 4 x 4 foreground gate ``>= 0.95``, l.142;
  scores upsampled with the default ``align_corners=False``, l.149; the alignment loss
  l.166-230 with the argmax of the grid scores as the query's masks).
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import open_dict
from torch import nn

from fsmis_bench.api import build_method, compose
from fsmis_bench.method import EpisodeBatch
from fsmis_methods.adnet import two_class
from fsmis_methods.qnet import reconstruction_loss, refine_prototype

EPS32 = float(torch.finfo(torch.float32).eps)  # the references' clamp of the probabilities
D = torch.float64


# -- hand arithmetic (float64) ---------------------------------------------------------------
def _source_index(i: int, n_in: int, n_out: int, align_corners: bool) -> tuple[int, int, float]:
    """Bilinear source cells and weight of output index ``i`` (PyTorch's two conventions)."""
    if align_corners:
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def bilinear(grid: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """``(..., h, w)`` -> ``(..., H, W)``, one output pixel at a time."""
    h, w = grid.shape[-2:]
    out = torch.zeros(*grid.shape[:-2], *size, dtype=D)
    for y in range(size[0]):
        y0, y1, ly = _source_index(y, h, size[0], align_corners)
        for x in range(size[1]):
            x0, x1, lx = _source_index(x, w, size[1], align_corners)
            top = (1 - lx) * grid[..., y0, x0] + lx * grid[..., y0, x1]
            bottom = (1 - lx) * grid[..., y1, x0] + lx * grid[..., y1, x1]
            out[..., y, x] = (1 - ly) * top + ly * bottom
    return out


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)``, ``(H, W)`` -> ``(C,)``: ``sum(f m) / (sum(m) + 1e-5)``."""
    return (features * mask).sum((1, 2)) / (mask.sum() + 1e-5)


def cosine_map(features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)``, ``(C,)`` -> ``(h, w)``."""
    dot = (features * prototype[:, None, None]).sum(0)
    return dot / (features.pow(2).sum(0).sqrt() * prototype.pow(2).sum().sqrt())


def anomaly_probability(features: torch.Tensor, prototype: torch.Tensor, threshold: float) -> torch.Tensor:
    """ADNet / Q-Net ``getPred``: ``1 - sigmoid(0.5 (-20 cos - T))``."""
    score = -20.0 * cosine_map(features, prototype)
    return 1.0 - 1.0 / (1.0 + torch.exp(-0.5 * (score - threshold)))


def clamped_nll(p_fg: torch.Tensor, labels: torch.Tensor, weights: tuple[float, float] = (1.0, 1.0)) -> float:
    """NLL of ``log(clamp([1 - p, p], eps, 1 - eps))``, class-weighted mean as ``nn.NLLLoss``."""
    p1 = p_fg.clamp(EPS32, 1 - EPS32)
    p0 = (1.0 - p_fg).clamp(EPS32, 1 - EPS32)
    per_pixel = torch.where(labels > 0.5, -torch.log(p1), -torch.log(p0))
    w = torch.where(labels > 0.5, torch.tensor(weights[1], dtype=D), torch.tensor(weights[0], dtype=D))
    return ((w * per_pixel).sum() / w.sum()).item()


def weighted_ce(scores: torch.Tensor, labels: torch.Tensor, weights: tuple[float, float] = (1.0, 1.0)) -> float:
    """``nn.CrossEntropyLoss(weight)`` of ``(2, H, W)`` scores: ``sum w_y (-log softmax_y) / sum w_y``."""
    log_norm = torch.log(torch.exp(scores).sum(0))
    per_pixel = torch.where(labels > 0.5, log_norm - scores[1], log_norm - scores[0])
    w = torch.where(labels > 0.5, torch.tensor(weights[1], dtype=D), torch.tensor(weights[0], dtype=D))
    return ((w * per_pixel).sum() / w.sum()).item()


def vectors(rows: list[list[tuple[float, ...]]]) -> torch.Tensor:
    """A feature map ``(C, h, w)`` from rows of per-cell vectors."""
    return torch.tensor(rows, dtype=D).permute(2, 0, 1)


class FixedEncoder(nn.Module):
    """Stands in for a method's encoder: returns hand-set outputs for a batch of ``n`` images."""

    def __init__(self, n: int, output) -> None:
        super().__init__()
        self.n, self.output = n, output

    def forward(self, images: torch.Tensor):
        assert images.shape[0] == self.n
        return self.output


def f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


# -- probability upsampling: align_corners=True ---------------------------------------------------
def test_probability_upsampling_uses_align_corners_true():
    """ADNet ``fewshot_anom.py`` l.77 and l.164, Q-Net ``fewshot.py`` l.102 and l.229:
    ``F.interpolate(pred, size, mode='bilinear', align_corners=True)``; 2 -> 4 samples the grid
    at 0, 1/3, 2/3, 1 (``align_corners=False`` would sample 0, 1/4, 3/4, 1)."""
    p = torch.tensor([[[0.0, 0.3], [0.6, 0.9]]])
    out = two_class(p, (4, 4))
    assert out.shape == (1, 2, 4, 4)
    expected = torch.tensor([[0.0, 0.1, 0.2, 0.3], [0.2, 0.3, 0.4, 0.5], [0.4, 0.5, 0.6, 0.7], [0.6, 0.7, 0.8, 0.9]])
    torch.testing.assert_close(out[0, 1], expected)
    torch.testing.assert_close(out[0, 0], 1 - expected)
    torch.testing.assert_close(out[0, 1].double(), bilinear(p[0].double(), (4, 4), align_corners=True))
    # Q-Net combines the upsampled paths: (0.9 up(1/4 path) + 0.1 up(1/8 path)) / (0.9 + 0.1)
    qnet = build_method(["method=qnet", "pretrained=false", "method.encoder=resnet18"])
    combined = qnet.combine([p, torch.tensor([[[0.5]]])], (4, 4))
    torch.testing.assert_close(combined[0], 0.9 * expected + 0.1 * 0.5)


# -- ADNet: the whole training loss ----------------------------------------------------------
# support and query of one episode: 2 channels on a 2 x 2 feature grid, 4 x 4 images
ADNET_SUPPORT = vectors([[(1.0, 0.0), (0.8, 0.6)], [(0.6, -0.8), (0.0, 1.0)]])
ADNET_QUERY = vectors([[(1.0, 0.2), (0.3, 1.0)], [(1.0, -0.5), (-0.2, 1.0)]])
ADNET_SUPPORT_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=D)
ADNET_QUERY_MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=D)


def _adnet_alignment_by_hand(query: torch.Tensor, query_p: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor,
                             threshold: float) -> float:
    """``alignLoss`` of one episode and one shot: the argmax of ``[1 - p, p]`` on the feature
    grid is the query's mask; its prototype a masked average on that grid; 0 when empty."""
    fg = (query_p > 1.0 - query_p).to(D)  # argmax: index 1 only when strictly larger
    if fg.sum() == 0:
        return 0.0
    prototype = (query * fg).sum((1, 2)) / (fg.sum() + 1e-5)
    p = anomaly_probability(support, prototype, threshold)
    return clamped_nll(bilinear(p, tuple(support_mask.shape), align_corners=True), support_mask)


def test_adnet_training_loss_by_hand():
    """ADNet ``fewshot_anom.py`` forward + ``alignLoss`` and ``main_train.py`` l.75-76, 144-146:
    weighted query NLL (``[0.1, 1]``, query prediction upsampled with ``align_corners=True``)
    + alignment NLL (prototype on the feature grid, l.146-151) + ``T / 20``."""
    torch.manual_seed(0)
    method = build_method(["method=adnet", "pretrained=false", "method.encoder=resnet18"])
    method.train()
    method.encoder = FixedEncoder(2, f32(torch.stack([ADNET_SUPPORT, ADNET_QUERY])))
    batch = EpisodeBatch(torch.zeros(1, 1, 1, 4, 4), f32(ADNET_SUPPORT_MASK)[None, None, None], torch.zeros(1, 1, 4, 4),
                         f32(ADNET_QUERY_MASK)[None, None])
    t = -10.0
    # getFeatures: features upsampled to the mask (align_corners=False), masked average
    prototype = masked_mean(bilinear(ADNET_SUPPORT, (4, 4), align_corners=False), ADNET_SUPPORT_MASK)
    query_p = anomaly_probability(ADNET_QUERY, prototype, t)
    # the case is one where the prediction and the alignment prototype are not trivial
    assert (query_p > 0.5).tolist() == [[True, False], [True, False]]
    query_loss = clamped_nll(bilinear(query_p, (4, 4), align_corners=True), ADNET_QUERY_MASK, (0.1, 1.0))
    align_loss = _adnet_alignment_by_hand(ADNET_QUERY, query_p, ADNET_SUPPORT, ADNET_SUPPORT_MASK, t)
    expected = query_loss + align_loss + t / 20.0
    assert method.training_loss(batch).item() == pytest.approx(expected, rel=1e-5)
    # the parts on their own: the query loss, and the alignment loss from the method's pieces
    without_align = build_method(["method=adnet", "pretrained=false", "method.encoder=resnet18", "method.align_weight=0",
                                  "method.threshold_loss_weight=0"])
    without_align.encoder = method.encoder
    assert without_align.training_loss(batch).item() == pytest.approx(query_loss, rel=1e-5)
    got = method.alignment_loss(f32(ADNET_QUERY)[None], f32(query_p)[None], f32(ADNET_SUPPORT)[None, None],
                                f32(ADNET_SUPPORT_MASK)[None, None, None], torch.full((1, 1, 1), t))
    assert got.item() == pytest.approx(align_loss, rel=1e-5)


def test_adnet_alignment_skips_empty_predictions_by_hand():
    """ADNet ``fewshot_anom.py`` ``alignLoss`` (l.146-148: ``skip_ways``) and l.91
    (``align_loss / batch_size``): an episode whose feature-grid prediction is empty adds 0,
    and the batch's sum is divided by the batch size. The masked form here gives that value
    and zero gradient to the skipped episode's inputs."""
    torch.manual_seed(0)
    method = build_method(["method=adnet", "pretrained=false", "method.encoder=resnet18"])
    g = torch.Generator().manual_seed(5)
    query = torch.randn(2, 4, 3, 3, generator=g)
    support = torch.randn(2, 1, 4, 3, 3, generator=g, requires_grad=True)
    support_masks = (torch.rand(2, 1, 1, 6, 6, generator=g) > 0.5).float()
    probability = torch.rand(2, 3, 3, generator=g)
    probability[0] = 0.1  # episode 0: empty prediction
    probability[1, 0, 0] = 0.5  # a tie is background (argmax takes the first class)
    thresholds = torch.tensor([-10.0, -6.0]).view(2, 1, 1)
    assert (probability[1] > 0.5).any() and not (probability[1] > 0.5).all()
    second = _adnet_alignment_by_hand(query[1].double(), probability[1].double(), support[1, 0].detach().double(),
                                      support_masks[1, 0, 0].double(), -6.0)
    both = method.alignment_loss(query, probability, support, support_masks, thresholds)
    assert both.item() == pytest.approx((0.0 + second) / 2, rel=1e-5)
    (gradient,) = torch.autograd.grad(both, support)
    assert torch.all(gradient[0] == 0) and torch.any(gradient[1] != 0)
    none = method.alignment_loss(query, torch.zeros(2, 3, 3), support, support_masks, thresholds)
    assert none.item() == 0.0
    (gradient,) = torch.autograd.grad(none, support)
    assert torch.all(gradient == 0)


# -- Q-Net: the whole training loss ----------------------------------------------------------
# path 1 (1/4): 2 x 2 grid; path 2 (1/8): 1 x 1 grid; 4 x 4 images; 2 channels
QNET_SUPPORT = (vectors([[(1.0, 0.0), (0.9, 0.3)], [(0.2, 1.0), (-0.3, 1.0)]]), vectors([[(1.0, 0.4)]]))
QNET_QUERY = (vectors([[(1.0, 0.1), (1.0, 0.9)], [(0.4, 1.0), (-0.5, 1.0)]]), vectors([[(0.7, 1.0)]]))
QNET_SUPPORT_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=D)
QNET_QUERY_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=D)


def test_qnet_training_loss_by_hand_uses_the_query_threshold():
    """Q-Net ``fewshot.py`` forward (l.61-62: ``T`` of the query, the support's ``T`` unused;
    l.102-105: paths upsampled with ``align_corners=True``, weights 0.9 / 0.1), ``alignLoss``
    (l.206-248: argmax of the full-resolution prediction, ``getFeatures`` per path, the
    query's ``T`` at l.227, unweighted NLL) and ``train.py`` l.65-66, 112-114 (query NLL with
    weights ``[0.1, 1]`` + alignment; no threshold loss). The encoder gives the support
    ``T = +4`` and the query ``T = -10``."""
    torch.manual_seed(0)
    method = build_method(["method=qnet", "pretrained=false", "method.encoder=resnet18"])
    method.train()
    t_support, t_query = 4.0, -10.0
    paths = [f32(torch.stack([s, q])) for s, q in zip(QNET_SUPPORT, QNET_QUERY)]
    method.encoder = FixedEncoder(2, (paths, torch.tensor([[t_support], [t_query]])))
    batch = EpisodeBatch(torch.zeros(1, 1, 1, 4, 4), f32(QNET_SUPPORT_MASK)[None, None, None], torch.zeros(1, 1, 4, 4),
                         f32(QNET_QUERY_MASK)[None, None])
    alpha = (0.9, 0.1)

    def combine(features, prototypes, threshold):
        ups = [bilinear(anomaly_probability(f, p, threshold), (4, 4), align_corners=True) for f, p in zip(features, prototypes)]
        return (alpha[0] * ups[0] + alpha[1] * ups[1]) / (alpha[0] + alpha[1])

    def get_features(features, mask):  # getFeatures: upsample (align_corners=False), masked average
        return masked_mean(bilinear(features, tuple(mask.shape), align_corners=False), mask)

    prototypes = [get_features(f, QNET_SUPPORT_MASK) for f in QNET_SUPPORT]
    prediction = combine(QNET_QUERY, prototypes, t_query)
    query_loss = clamped_nll(prediction, QNET_QUERY_MASK, (0.1, 1.0))
    foreground = (prediction > 1.0 - prediction).to(D)
    assert 0 < foreground.sum() < 16
    query_prototypes = [get_features(f, foreground) for f in QNET_QUERY]
    align_loss = clamped_nll(combine(QNET_SUPPORT, query_prototypes, t_query), QNET_SUPPORT_MASK)
    # the support's T would give another alignment loss: the case tells the two apart
    with_support_t = clamped_nll(combine(QNET_SUPPORT, query_prototypes, t_support), QNET_SUPPORT_MASK)
    assert abs(with_support_t - align_loss) > 0.1
    assert method.training_loss(batch).item() == pytest.approx(query_loss + align_loss, rel=1e-5)
    method.options = type(method.options)(**{**method.options.__dict__, "align_weight": 0.0})
    assert method.training_loss(batch).item() == pytest.approx(query_loss, rel=1e-5)


# -- Q-Net: the refinement objective ---------------------------------------------------------
def test_qnet_refinement_bce_takes_the_originals_as_input_and_the_rebuilt_as_target():
    """Q-Net ``fewshot.py`` ``updatePrototype`` l.133-142: ``new_fts`` = features with the
    predicted foreground replaced by the prototype; ``fts_norm`` / ``new_fts_norm`` = sigmoid
    of the min-max normalised (per query, over C, h, w) originals / rebuilt;
    ``nn.BCELoss()(fts_norm, new_fts_norm)``: the originals are the *input*, the rebuilt the
    *target*, so the prototype's gradient flows through the target."""
    # query 0: features (0, 1, 4), foreground the middle, prototype 3 -> rebuilt (0, 3, 4);
    # query 1: the same scaled by 2 (per-query normalisation gives the same value)
    features = torch.tensor([[0.0, 1.0, 4.0], [0.0, 2.0, 8.0]]).view(2, 1, 1, 3)
    foreground = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3).expand(2, 1, 1, 3)
    prototype = torch.tensor([[3.0], [6.0]], requires_grad=True)
    loss = reconstruction_loss(features, prototype, foreground)

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    x = [sig(0.0), sig(0.25), sig(1.0)]  # input: originals normalised to (0, 1/4, 1)
    y = [sig(0.0), sig(0.75), sig(1.0)]  # target: rebuilt normalised to (0, 3/4, 1)
    expected = -sum(yi * math.log(xi) + (1 - yi) * math.log(1 - xi) for xi, yi in zip(x, y)) / 3
    swapped = -sum(xi * math.log(yi) + (1 - xi) * math.log(1 - yi) for xi, yi in zip(x, y)) / 3
    assert abs(expected - swapped) > 1e-3  # the case tells input and target apart
    assert loss.tolist() == pytest.approx([expected, expected], rel=1e-6)
    # d/dp: d BCE / d target = -logit(input) / 3 = -(1/4) / 3 at the middle; d target / dp =
    # y (1 - y) / (max - min) of the rebuilt (4 for query 0, 8 for query 1)
    (gradient,) = torch.autograd.grad(loss.sum(), prototype)
    slope = y[1] * (1 - y[1])
    assert gradient.flatten().tolist() == pytest.approx([-0.25 / 3 * slope / 4, -0.25 / 3 * slope / 8], rel=1e-5)


def _refine_by_hand(features: torch.Tensor, prototype: torch.Tensor, threshold: float, iterations: int,
                    lr: float = 0.01) -> tuple[torch.Tensor, list[int]]:
    """``updatePrototype`` for one query, with the BCE's gradient written out and Adam's
    update (betas 0.9 / 0.999, eps 1e-8, bias-corrected) step by step.

    ``L = mean over (C, h, w) of -(y log x + (1 - y) log(1 - x))`` with ``x`` the sigmoid of
    the min-max normalised originals (input) and ``y`` that of the rebuilt features (target).
    The prototype ``p`` enters ``y`` at the predicted foreground only (the case keeps the
    rebuilt minimum and maximum elsewhere), so ``dL/dp_c = sum over foreground k of
    -logit(x_kc) * y_c (1 - y_c) / (max - min) / (C h w)``. Returns the prototype and the
    size of the predicted foreground at each step."""
    c, h, w = features.shape
    low, high = features.min(), features.max()
    logit_x = (features - low) / (high - low)  # logit(sigmoid(z)) = z
    p = prototype.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    sizes = []
    for step in range(1, iterations + 1):
        fg = anomaly_probability(features, p, threshold) > 0.5  # the prediction with the current p
        sizes.append(int(fg.sum()))
        rebuilt = torch.where(fg, p[:, None, None], features)
        r_low, r_high = rebuilt.min(), rebuilt.max()
        if fg.any():
            assert r_low < p.min() and p.max() < r_high and (features[:, ~fg] == r_low).any() and (features[:, ~fg] == r_high).any()
        y = 1.0 / (1.0 + torch.exp(-(p - r_low) / (r_high - r_low)))
        g = -(logit_x * fg).sum((1, 2)) * y * (1 - y) / (r_high - r_low) / (c * h * w)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p - lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
    return p, sizes


def test_qnet_refinement_steps_per_query_by_hand():
    """Q-Net ``fewshot.py`` ``updatePrototype`` (l.121-154): Adam (lr 0.01) on the prototype,
    the BCE of l.139-142 (originals input, rebuilt target), the prediction recomputed after
    every step (l.149-150); here for three queries at once, each with its own ``T``.

    After one step each entry moved by ``-lr g / (|g| + 1e-8)``: ``+0.01`` where the gradient
    is negative, 0 where it is 0 -- and with the originals as input ``dL/dy = -logit(x) <= 0``,
    0 exactly where the original is the query's minimum. Query 0 (``T = -16``: foreground
    where cos > 0.8) predicts position 0: ``(1.01, 0.01)``; as the prototype turns towards
    position 1 (cos .781 at the start), that one joins the prediction a few steps later. Query 1 (``T = -19.99``:
    cos > 0.9995) predicts nothing: unchanged. Query 2 (``T = -18``: cos > 0.9) predicts
    position 0, whose channel 1 is the query's minimum: ``(1.01, 0)``. Then the seven steps
    of the released setting, by hand."""
    prototype = torch.tensor([[1.0, 0.0]])
    same = [(1.0, 0.1), (1.0, 0.8), (0.5, 1.5), (-1.0, 2.0)]  # cos with p: .995, .781, .316, -.447
    third = [(3.0, -1.0), (0.5, 1.5), (-1.0, 0.5), (0.2, 0.2)]  # cos: .949, .316, -.894, .707
    maps = [vectors([same]), vectors([same]), vectors([third])]
    ts = [-16.0, -19.99, -18.0]
    features = torch.stack(maps).float()
    thresholds = torch.tensor(ts).view(3, 1, 1)
    one = refine_prototype(features, prototype, thresholds, iterations=1, lr=0.01)
    torch.testing.assert_close(one, torch.tensor([[1.01, 0.01], [1.0, 0.0], [1.01, 0.0]]), atol=1e-6, rtol=0)
    by_hand = torch.stack([_refine_by_hand(f, prototype[0].double(), t, 1)[0] for f, t in zip(maps, ts)])
    torch.testing.assert_close(one.double(), by_hand, atol=1e-6, rtol=0)
    seven = refine_prototype(features, prototype, thresholds, iterations=7, lr=0.01)
    hand = [_refine_by_hand(f, prototype[0].double(), t, 7) for f, t in zip(maps, ts)]
    by_hand = torch.stack([p for p, _ in hand])
    assert hand[0][1][0] == 1 and hand[0][1][-1] == 2 and set(hand[1][1]) == {0} and set(hand[2][1]) == {1}
    assert not torch.allclose(by_hand[0], by_hand[2])  # each query its own prototype
    torch.testing.assert_close(seven.double(), by_hand, atol=1e-6, rtol=0)


# -- SSL-ALPNet: the whole training loss -----------------------------------------------------
def _alp_prototypes(features: torch.Tensor, mask: torch.Tensor, window: int, foreground: bool) -> list[torch.Tensor]:
    """``alpmodule.py`` for one shot: ``(C, h, w)`` features, ``(h, w)`` class mask.

    Background (``gridconv``): the window-averaged features of the windows whose averaged mask
    exceeds 0.95. Foreground: those plus the masked average (``gridconv+``) when some 4 x 4
    window of the mask averages >= 0.95, else the masked average alone (``mask``)."""
    c, h, w = features.shape

    def windows(size: int):
        for r in range(0, h - size + 1, size):
            for s in range(0, w - size + 1, size):
                yield features[:, r : r + size, s : s + size].mean((1, 2)), mask[r : r + size, s : s + size].mean()

    glob = (features * mask).sum((1, 2)) / (mask.sum() + 1e-5)
    local = [f for f, m in windows(window) if m > 0.95]
    if not foreground:
        assert local, "the released code has no background prototype here (the case must avoid it)"
        return local
    gate = max(m for _, m in windows(4)) >= 0.95
    return [*local, glob] if gate else [glob]


def _alp_scores(query: torch.Tensor, prototypes: list[torch.Tensor]) -> torch.Tensor:
    """``sum_k softmax_k(d) d_k``, ``d_k = 20 cos`` with ``safe_norm`` (eps 1e-4): ``(h, w)``."""
    q = query / query.pow(2).sum(0).sqrt().clamp_min(1e-4)
    d = torch.stack([20.0 * (q * (p / p.pow(2).sum().sqrt().clamp_min(1e-4))[:, None, None]).sum(0) for p in prototypes])
    weights = torch.exp(d - d.max(0).values)
    return (weights / weights.sum(0) * d).sum(0)


def _alp_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 x 8 feature grid, 16 x 16 images, 3 channels. Support: foreground image rows 0-8,
    columns 0-7 (on the grid: window (0, 0) fully, grid row 4 half); each 4 x 4 window has its
    own direction plus a little noise. The query: the same layout, other noise."""
    g = torch.Generator().manual_seed(11)
    directions = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.3, 0.0, 1.0], [0.5, 0.5, 0.5]], dtype=D)
    base = torch.zeros(3, 8, 8, dtype=D)
    for k, (r, s) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        base[:, r : r + 4, s : s + 4] = directions[k][:, None, None]
    support = base + 0.2 * torch.randn(3, 8, 8, generator=g, dtype=D)
    query = base + 0.2 * torch.randn(3, 8, 8, generator=g, dtype=D)
    support_mask = torch.zeros(16, 16, dtype=D)
    support_mask[:9, :8] = 1
    query_mask = torch.zeros(16, 16, dtype=D)
    query_mask[:7, :9] = 1
    return support, query, support_mask, query_mask


def test_ssl_alpnet_training_loss_by_hand():
    """SSL-ALPNet ``training.py`` l.105-106, 140-141 with ``util/utils.py``
    ``compose_wt_simple`` (CE weights ``[0.05, 1]``: background 0.05) and
    ``grid_proto_fewshot.py`` forward + ``alignLoss`` with ALP in training (window 4): masks
    resized to the grid bilinearly, scores upsampled with ``align_corners=False``, the query's
    grid argmax as the support of the alignment pass, unweighted CE there."""
    support, query, support_mask, query_mask = _alp_case()
    method = build_method(["method=ssl_alpnet", "pretrained=false", "method.encoder=resnet18"])
    assert method.options.class_weights == (0.05, 1.0)
    method.train()
    method.encoder = FixedEncoder(2, f32(torch.stack([support, query])))
    batch = EpisodeBatch(torch.zeros(1, 1, 1, 16, 16), f32(support_mask)[None, None, None], torch.zeros(1, 1, 16, 16),
                         f32(query_mask)[None, None])

    grid_mask = bilinear(support_mask, (8, 8), align_corners=False)  # 2 x 2 block means here
    assert grid_mask[4, :4].tolist() == [0.5] * 4 and grid_mask[:4, :4].min() == 1
    background = _alp_prototypes(support, 1 - grid_mask, 4, foreground=False)
    foreground = _alp_prototypes(support, grid_mask, 4, foreground=True)
    # background: windows (0, 1) and (1, 1) (window (1, 0) averages 0.875); foreground: window
    # (0, 0) and the masked average (the 4 x 4 gate passes)
    assert (len(background), len(foreground)) == (2, 2)
    scores = torch.stack([_alp_scores(query, background), _alp_scores(query, foreground)])
    query_loss = weighted_ce(bilinear(scores, (16, 16), align_corners=False), query_mask, (0.05, 1.0))
    # alignment: the query's grid argmax (foreground only when strictly larger) as its mask
    predicted = (scores[1] > scores[0]).to(D)
    assert predicted[:4, :4].min() == 1 and predicted[:, 4:].max() == 0  # the case stays compact
    back = torch.stack([_alp_scores(support, _alp_prototypes(query, 1 - predicted, 4, foreground=False)),
                        _alp_scores(support, _alp_prototypes(query, predicted, 4, foreground=True))])
    align_loss = weighted_ce(bilinear(back, (16, 16), align_corners=False), support_mask)
    assert method.training_loss(batch).item() == pytest.approx(query_loss + align_loss, rel=1e-5)
    # the background weight 0.05 matters here: the swapped weights give another value
    swapped = weighted_ce(bilinear(scores, (16, 16), align_corners=False), query_mask, (1.0, 0.05))
    assert abs(swapped - query_loss) > 0.05
    # the code's own default (a config without the key) is the same
    cfg = compose(["method=ssl_alpnet", "pretrained=false", "method.encoder=resnet18"])
    with open_dict(cfg):
        del cfg.method["class_weights"]
    assert build_method(cfg).options.class_weights == (0.05, 1.0)
