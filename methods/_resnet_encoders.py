"""ResNet / DeepLabv3 encoders of the classic FSMIS methods, with torchvision's layout.

SSL-ALPNet, ADNet and Q-Net all start from torchvision's ``deeplabv3_resnet101``. torchvision
itself cannot be imported beside the pinned CPU torch here, so the architecture is rebuilt
with the *same module names and shapes*: a torchvision state dict (the COCO file
``deeplabv3_resnet101_coco-586e9e4e.pth`` or the ImageNet ``resnet101-63fe2227.pth``) loads
with ``strict=True``. Everything is plain ``nn.Module`` code; only the names follow
torchvision so that its checkpoints fit.

* :class:`ResNet` — ``conv1, bn1, relu, maxpool, layer1..layer4`` (+ ``avgpool, fc`` when
  ``with_fc``), ``replace_stride_with_dilation`` as torchvision's. Basic blocks accept a
  dilation too (torchvision refuses it), so a ResNet-18 can stand in for the 101 on a CPU.
* :class:`DeepLabV3` — ``backbone`` (a ResNet without ``avgpool``/``fc``, dilation
  ``[False, True, True]``: output stride 8), ``classifier`` (ASPP head) and
  ``aux_classifier`` (FCN head on ``layer3``), as the COCO checkpoint has them.
* :func:`load_encoder_weights` — finds a checkpoint (an explicit path, ``weights_root``, the
  torch hub cache, or a download when the host answers), loads it ``weights_only``, and
  returns its identity (path + SHA-256, checked against the hash prefix in torchvision's
  file name).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsmis_bench.errors import ConfigError, FsmisError
from fsmis_bench.method import Method

from ._pickle_safety import read_pickle
from ._weight_digest import file_digest

#: blocks per stage and block type of each supported depth.
RESNET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
ENCODERS = {"resnet18": 18, "resnet50": 50, "resnet101": 101}

#: torchvision's released checkpoints: (init, depth) -> file name. The 8 hex digits before
#: ``.pth`` are the start of the file's SHA-256 (torchvision's own integrity check).
TORCHVISION_FILES: dict[tuple[str, int], str] = {
    ("coco", 101): "deeplabv3_resnet101_coco-586e9e4e.pth",
    ("coco", 50): "deeplabv3_resnet50_coco-cd0a2569.pth",
    ("imagenet", 101): "resnet101-63fe2227.pth",
    ("imagenet", 50): "resnet50-0676ba61.pth",
    ("imagenet", 18): "resnet18-f37072fd.pth",
}
DOWNLOAD_BASE = "https://download.pytorch.org/models/"
INITS = ("coco", "imagenet")


# ---------------------------------------------------------------------------------------
# ResNet (torchvision names)
# ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout: ``(N, 3, H, W)`` -> stage outputs.

    Args:
        depth: 18, 50 or 101.
        replace_stride_with_dilation: per stage 2..4, keep the resolution and dilate instead
            (DeepLabv3: ``(False, True, True)``, output stride 8; Q-Net: ``(True, True, False)``).
        with_fc: keep ``avgpool`` + ``fc`` (1000 classes), as an ImageNet classifier has them.
    """

    def __init__(self, depth: int, replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False), with_fc: bool = True) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ConfigError(f"no ResNet-{depth}", hint=f"use one of {', '.join(ENCODERS)}")
        kind, layers = RESNET_LAYERS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0], 1, False)
        self.layer2 = self._stage(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._stage(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._stage(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.channels = (64 * block.expansion, 128 * block.expansion, 256 * block.expansion, 512 * block.expansion)
        if with_fc:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, 1000)
        # torchvision's initialisation (its random-weights model is this one)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, block: type, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 3, H, W)`` -> (``layer3`` output, ``layer4`` output)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        layer3 = self.layer3(self.layer2(self.layer1(x)))
        return layer3, self.layer4(layer3)


# ---------------------------------------------------------------------------------------
# DeepLabv3 heads (only so that the COCO checkpoint loads strictly and counts are exact)
# ---------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=dilation if kernel == 3 else 0, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, rates: tuple[int, ...] = (12, 24, 36), cout: int = 256) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(cin, cout, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(cin, cout, 3, rate)) for rate in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__(ASPP(cin), *_conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1))


class FCNHead(nn.Sequential):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__(*_conv_bn_relu(cin, cin // 4, 3), nn.Dropout(0.1), nn.Conv2d(cin // 4, num_classes, 1))


class DeepLabV3(nn.Module):
    """torchvision's ``deeplabv3_resnet{50,101}`` (21 classes; ``aux`` as the COCO file has it).

    Only ``backbone`` is used by the FSMIS methods; the heads exist so that the released
    checkpoint loads with ``strict=True`` and the parameter count can be checked.
    """

    def __init__(self, depth: int = 101, num_classes: int = 21, aux: bool = True) -> None:
        super().__init__()
        self.backbone = ResNet(depth, (False, True, True), with_fc=False)
        self.classifier = DeepLabHead(self.backbone.channels[3], num_classes)
        self.aux_classifier = FCNHead(self.backbone.channels[2], num_classes) if aux else None


# ---------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFile:
    """A loaded checkpoint: where it came from and its SHA-256."""

    path: str
    sha256: str

    def identity(self) -> dict[str, str]:
        return {"source": self.path, "digest": f"sha256:{self.sha256}"}


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a weight file, cached per path, size and mtime across processes like
    the SD weights' (:func:`._weight_digest.file_digest`): runs build one method per group."""
    return file_digest(path).split(":", 1)[1]


def _host_answers(url: str, timeout: float = 1.5) -> bool:
    host = re.sub(r"^https?://", "", url).split("/", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def find_weight_file(file_name: str, source: str | None, weights_root: str | None) -> Path:
    """The checkpoint to load: ``source`` (a path, relative ones under ``weights_root``) or,
    without one, ``file_name`` under ``weights_root``, ``weights_root/torchvision``, the torch
    hub cache, or downloaded there (torchvision's URL) when the host answers.

    Raises:
        FsmisError: nothing found and no download possible, with where to put the file.
    """
    root = Path(os.path.expanduser(str(weights_root))) if weights_root else None
    if source:
        path = Path(os.path.expanduser(str(source)))
        candidates = [path] if path.is_absolute() else ([root / path] if root else []) + [Path.cwd() / path]
    else:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        candidates = ([root / file_name, root / "torchvision" / file_name] if root else []) + [hub / file_name]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    url = DOWNLOAD_BASE + file_name
    if not source and _host_answers(url):
        torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        return (Path(torch.hub.get_dir()) / "checkpoints" / file_name).resolve()
    where = root / "torchvision" / file_name if root else Path("<weights_root>/torchvision") / file_name
    raise FsmisError(
        f"encoder weights {source or file_name} not found (looked in: {', '.join(map(str, candidates))})",
        hint=f"download {url} to {where} (and set FSMIS_WEIGHTS_ROOT), or run with pretrained=false "
        "for architecture-identical random weights (marked random_weights in the record)",
    )


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], WeightFile]:
    """Load a checkpoint with ``weights_only=True``; check torchvision's hash prefix if the name has one."""
    sha = file_sha256(path)
    prefix = re.search(r"-([0-9a-f]{8,})\.pth?$", path.name)
    if prefix and not sha.startswith(prefix.group(1)):
        raise FsmisError(
            f"{path} is damaged or not the released file: its SHA-256 starts {sha[:8]}, its name says {prefix.group(1)}",
            hint="download it again",
        )
    # a pickle with code in it is refused as such (a safety stop), a truncated file as damage
    state = read_pickle(path, "the ResNet encoder weights", hint="download it again; only plain state dicts load")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state, WeightFile(str(path), sha)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error instead of a key dump."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise FsmisError(f"{what} does not fit the architecture: {' '.join(first)}",
                         hint="check method.encoder and method.init against the file") from None


@dataclass
class BuiltEncoder:
    """A ResNet ready for a method, and what initialised it.

    Attributes:
        resnet: the network (with ``fc`` if asked for).
        weights: the loaded file, or None for random weights.
        init: ``coco``, ``imagenet`` or ``random``.
    """

    resnet: ResNet
    weights: WeightFile | None
    init: str


def build_resnet_encoder(
    encoder: str,
    init: str,
    *,
    pretrained: bool,
    dilation: tuple[bool, bool, bool],
    with_fc: bool,
    source: str | None = None,
    weights_root: str | None = None,
) -> BuiltEncoder:
    """The ResNet of a method, initialised as the references do.

    ``init="coco"``: the backbone of torchvision's COCO DeepLabv3 (loaded strictly into the
    whole DeepLabv3, then the backbone taken; an ``fc`` the method wants stays at its random
    initialisation, as in Q-Net). ``init="imagenet"``: torchvision's ImageNet classifier
    (strict; ``fc`` dropped unless ``with_fc``). ``pretrained=False``: the same architecture
    with torchvision's random initialisation.

    Args:
        encoder: ``resnet101`` (the references), ``resnet50`` or ``resnet18`` (CPU variants).
        dilation: ``replace_stride_with_dilation`` of the method.
    """
    if encoder not in ENCODERS:
        raise ConfigError(f"method.encoder={encoder!r} is unknown", hint=f"use one of {', '.join(ENCODERS)}")
    if init not in INITS:
        raise ConfigError(f"method.init={init!r} is unknown", hint=f"use one of {', '.join(INITS)} (or null to follow fidelity)")
    depth = ENCODERS[encoder]
    resnet = ResNet(depth, dilation, with_fc=with_fc)
    if not pretrained:
        return BuiltEncoder(resnet, None, "random")
    file_name = TORCHVISION_FILES.get((init, depth))
    if file_name is None and not source:
        raise ConfigError(
            f"torchvision released no {init} weights for {encoder}",
            hint="use method.init=imagenet, method.encoder=resnet101/resnet50, or pretrained=false",
        )
    path = find_weight_file(file_name or "", source, weights_root)
    state, weights = read_state_dict(path)
    if init == "coco":
        full = DeepLabV3(depth, aux=any(k.startswith("aux_classifier.") for k in state))
        load_strict(full, state, str(path))
        missing, unexpected = resnet.load_state_dict(full.backbone.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
    else:
        classifier = ResNet(depth, dilation, with_fc=True)
        load_strict(classifier, state, str(path))
        resnet.load_state_dict({k: v for k, v in classifier.state_dict().items() if with_fc or not k.startswith("fc.")})
    return BuiltEncoder(resnet, weights, init)


class DeepLabFeatures(nn.Module):
    """SSL-ALPNet's encoder, reused by ADNet: the DeepLabv3 backbone (output stride 8) and a
    bias-free 1x1 ``localconv`` from its ``layer4`` channels to ``dim`` (the references keep
    the ASPP head but never call it, so it is left out here).

    ``forward((N, 1 or 3, H, W)) -> (N, dim, H/8, W/8)``.

    Attributes:
        random_weights: True when the ResNet should be pretrained and is not.
        weights: the loaded checkpoint (None for random weights).
    """

    def __init__(self, built: BuiltEncoder, dim: int = 256) -> None:
        super().__init__()
        self.backbone = built.resnet
        self.localconv = nn.Conv2d(self.backbone.channels[3], dim, 1, bias=False)
        self.random_weights = built.weights is None
        self.backbone.random_weights = self.random_weights  # read by `fsmis-bench describe`
        self.weights = built.weights
        self.init = built.init

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.localconv(self.backbone.stages(grey_to_rgb(images))[1])


def encoder_from_cfg(cfg, *, dilation: tuple[bool, bool, bool], with_fc: bool, init: str) -> BuiltEncoder:
    """:func:`build_resnet_encoder` from a run config (``method.encoder``, ``method.encoder_source``,
    ``pretrained``, ``weights_root``)."""
    return build_resnet_encoder(
        str(cfg.method.get("encoder") or "resnet101"), init,
        pretrained=bool(cfg.get("pretrained", True)), dilation=dilation, with_fc=with_fc,
        source=cfg.method.get("encoder_source"), weights_root=cfg.get("weights_root"),
    )


def grey_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 3, H, W)``: the references stack the z-scored slice 3 times."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class ResNetEncoderMethod(Method):
    """What SSL-ALPNet, ADNet and Q-Net share around their ResNet ``self.encoder`` (which
    carries ``weights`` and ``random_weights``): one parameter group at ``options.lr``, the
    encoder file's digest as the weight identity, and the random-weights flag."""

    encoder: nn.Module
    options: object

    def param_groups(self) -> list[dict]:
        return [{"name": "all", "params": [p for p in self.parameters() if p.requires_grad], "lr": self.options.lr}]

    def weight_identity(self) -> dict:
        weights = self.encoder.weights
        return {} if weights is None else {"encoder": weights.identity()}

    def uses_random_weights(self) -> bool:
        return self.encoder.random_weights

    def resolved_options(self) -> dict[str, Any]:
        """``cfg.method`` with every option as the method resolved it (ADNet's ``init``
        null -> ``coco``, Q-Net's ``path_weight`` null -> its setting's value), for run.json."""
        options = super().resolved_options()
        if dataclasses.is_dataclass(self.options):
            options.update(dataclasses.asdict(self.options))
        return options


__all__ = [
    "BasicBlock", "Bottleneck", "BuiltEncoder", "DeepLabFeatures", "DeepLabV3", "encoder_from_cfg", "ENCODERS", "INITS", "ResNet",
    "ResNetEncoderMethod",
    "TORCHVISION_FILES", "WeightFile", "build_resnet_encoder", "file_sha256", "find_weight_file",
    "grey_to_rgb", "load_strict", "read_state_dict",
]
