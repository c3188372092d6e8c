"""LPIPS (Zhang et al. 2018, v0.1) in pure torch, with the `lpips` package's calibrated weights.

The `lpips` package builds its backbones from torchvision (`tv.vgg16(pretrained=True).features`),
and torchvision does not import beside our CPU torch build. The package's wheel does ship the
calibrated linear layers (`lpips/weights/v0.1/{vgg,alex}.pth`, a few KB); this module finds that
file through `importlib.util.find_spec` without importing `lpips` and rebuilds the rest:
torchvision's VGG-16 / AlexNet `features` (same Sequential indices, so the published torchvision
checkpoints `vgg16-397923af.pth` / `alexnet-owt-7be5be79.pth` load key for key; their classifier
is unused), lpips' ScalingLayer, the five taps (relu1_2 ... relu5_3 / relu1 ... relu5), channel-wise
unit normalisation (eps 1e-10), squared differences, 1x1 linear layers and spatial means.

Which pairs: for edits, each edited image against its source image (metadata "source_image");
for generation, the SoftREPA authors' eval.py compares each generated image with the COCO image of
the same file name (val2017, resized), both resized to 299 x 299, VGG network. That is what
`softrepa evaluate --metrics lpips --reference DIR` does (see `inputs.image_pairs` for the pairing).
Their script feeds uint8 tensors (0..255) to `lpips.LPIPS` without `normalize=True`, i.e. not the
[-1, 1] range LPIPS is calibrated for; `input_range: authors_uint8` reproduces that bit for bit,
the default `minus1_1` is LPIPS as specified. Results record which one was used.

The metrics.yaml section is `LPIPSConfig`; the spec `LPIPS` (kind `PER_PAIR`) is declared and
registered at the end of this module.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError
from .common import MetricError, WeightsError, check_keys, load_state_dict, resolve_file, to_tensor
from .spec import MetricConfig, MetricKind, MetricSpec, register_metric

BACKBONE_URLS = {"vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
                 "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"}
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1 (also in the `lpips` wheel)"
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
#: End index (exclusive) of each tap in `features` (lpips.pretrained_networks slices).
TAPS = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def backbone_features(net: str) -> nn.Sequential:
    """torchvision's `vgg16().features` (config "D") or `alexnet().features`, same indices."""
    layers: list[nn.Module] = []
    if net == "vgg":
        cin = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
    elif net == "alex":
        layers = [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)]
    else:
        raise ConfigError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
    return nn.Sequential(*layers)


def backbone_state_shapes(net: str) -> dict[str, tuple]:
    """Key -> shape of torchvision's published VGG-16 / AlexNet ImageNet checkpoints."""
    out: dict[str, tuple] = {}
    for i, m in enumerate(backbone_features(net)):
        if isinstance(m, nn.Conv2d):
            out[f"features.{i}.weight"], out[f"features.{i}.bias"] = tuple(m.weight.shape), (m.out_channels,)
    heads = ({0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)} if net == "vgg"
             else {1: (4096, 9216), 4: (4096, 4096), 6: (1000, 4096)})
    for i, shape in heads.items():
        out[f"classifier.{i}.weight"], out[f"classifier.{i}.bias"] = shape, shape[:1]
    return out


class _Lin(nn.Module):
    """lpips' NetLinLayer: Dropout (identity at eval) + 1x1 conv without bias; same keys."""

    def __init__(self, c: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPSNet(nn.Module):
    """LPIPS v0.1 distance between image batches in [-1, 1] (lpips' `LPIPS.forward`)."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        self.net = net
        self.features = backbone_features(net)
        for k, c in enumerate(CHANNELS[net]):
            setattr(self, f"lin{k}", _Lin(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in TAPS[self.net]:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """(B,) distances."""
        f0, f1 = self.taps((x0 - self.shift) / self.scale), self.taps((x1 - self.shift) / self.scale)
        total = 0
        for k, (a, b) in enumerate(zip(f0, f1)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((a - b) ** 2).mean((2, 3), keepdim=True)
        return total.flatten()


def packaged_lin_weights(net: str) -> Path | None:
    """The linear-layer file inside an installed `lpips` wheel (found without importing lpips)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    return p if p.is_file() else None


class LPIPSScorer:
    """Per-pair LPIPS with the configured preprocessing.

    Args:
        model: `LPIPSNet` with weights loaded.
        resize: square side both images are resized to (PIL bilinear, as torchvision
            `Resize((n, n))`), or None for native sizes (the two images of each pair must match).
        input_range: "minus1_1" (LPIPS as calibrated) or "authors_uint8" (the SoftREPA eval.py inputs).
        device, dtype: where / how the model runs.
    """

    name = "lpips"

    def __init__(self, model: LPIPSNet, *, resize: int | None = 299, input_range: str = "minus1_1",
                 device="cpu", dtype=torch.float32):
        if input_range not in ("minus1_1", "authors_uint8"):
            raise ConfigError(f"lpips input_range must be minus1_1 or authors_uint8, got {input_range!r}")
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
            raise ConfigError(f"lpips resize must be a positive integer or null, got {resize!r}")
        self.model, self.resize, self.input_range = model.to(device, dtype).eval(), resize, input_range
        self.device, self.dtype = torch.device(device), dtype

    def info(self) -> dict[str, Any]:
        """What results.json records about this scorer: network, resize, input range."""
        return {"net": self.model.net, "resize": self.resize, "input_range": self.input_range}

    def _prep(self, images) -> torch.Tensor:
        if self.resize:
            images = [im.resize((self.resize, self.resize), Image.BILINEAR) for im in images]
        x = torch.stack([to_tensor(im) for im in images])
        # authors: ToTensor -> (x * 255).byte(), fed as is; LPIPS proper: 2x - 1.
        x = (x * 255).to(torch.uint8).float() if self.input_range == "authors_uint8" else 2 * x - 1
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def distance(self, images_a, images_b) -> np.ndarray:
        """LPIPS of each pair (PIL images), float64.

        With `resize` set every image becomes resize x resize and the pairs run as one batch.
        With `resize: None` (native sizes: the two images of a pair must match, pairs may differ
        from each other) the pairs are run one by one, so each distance is exactly the batch-size-1
        result the `lpips` package gives for that pair.
        """
        images_a, images_b = list(images_a), list(images_b)
        if len(images_a) != len(images_b):
            raise MetricError(f"lpips: {len(images_a)} images but {len(images_b)} paired images")
        if not images_a:
            return np.zeros(0)
        if self.resize:
            return self.model(self._prep(images_a), self._prep(images_b)).double().cpu().numpy()
        for a, b in zip(images_a, images_b):
            if a.size != b.size:
                raise MetricError(f"lpips: image sizes differ within a pair ({a.size} vs {b.size}); "
                                  "set lpips.resize to compare images of different sizes")
        return np.array([float(self.model(self._prep([a]), self._prep([b]))[0]) for a, b in zip(images_a, images_b)])


def load_lpips(cfg: "LPIPSConfig | dict", *, device="cpu", dtype=torch.float32, offline=True) -> LPIPSScorer:
    """LPIPS from `cfg` (`LPIPSConfig`: net, backbone_weights, lin_weights ("lpips-package" or a path), resize,
    input_range)."""
    cfg = LPIPSConfig.coerce(cfg, metric="lpips")
    net = cfg.net
    if net not in CHANNELS:
        raise WeightsError(f"lpips: net must be 'vgg' or 'alex', got {net!r}")
    bpath = resolve_file(cfg.backbone_weights, metric="lpips", what=f"torchvision {net} ImageNet weights",
                         filename=Path(BACKBONE_URLS[net]).name, url=BACKBONE_URLS[net], offline=offline)
    lin_spec = cfg.lin_weights
    lpath = packaged_lin_weights(net) if lin_spec == "lpips-package" else Path(str(lin_spec)).expanduser()
    if lpath is None or not lpath.is_file():
        why = f"no {net}.pth in an installed lpips package" if lin_spec == "lpips-package" else "no such file"
        raise WeightsError(f"lpips: linear-layer weights {lin_spec!r} not found ({why}); `pip install --no-deps lpips` "
                           f"(its wheel ships them) or download {net}.pth from {LIN_URL}")
    model = LPIPSNet(net)
    backbone = {k: v for k, v in load_state_dict(bpath, metric="lpips").items() if k.startswith("features.")}
    sd = {**backbone, **load_state_dict(lpath, metric="lpips")}
    check_keys(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, metric="lpips",
               path=f"{bpath} + {lpath}")
    model.load_state_dict(sd, strict=True)
    return LPIPSScorer(model, resize=cfg.resize, input_range=cfg.input_range, device=device, dtype=dtype)


@dataclass(frozen=True)
class LPIPSConfig(MetricConfig):
    """metrics.yaml `lpips`: LPIPS v0.1 (the authors: VGG, both images resized to 299).

    Args:
        net: "vgg" or "alex".
        backbone_weights: torchvision's ImageNet checkpoint of `net` (file or folder).
        lin_weights: "lpips-package" (the file inside an installed `lpips` wheel) or a path.
        resize: square side both images are resized to; None: native sizes.
        input_range: "minus1_1" (LPIPS as calibrated) or "authors_uint8" (the authors' eval.py).
    """

    net: str = "vgg"
    backbone_weights: str | None = None
    lin_weights: str = "lpips-package"
    resize: int | None = 299
    input_range: str = "minus1_1"


LPIPS = MetricSpec(name="lpips", kind=MetricKind.PER_PAIR, loader=load_lpips, config=LPIPSConfig,
                   higher_is_better=False, note="LPIPS v0.1 vs the paired image (lower = more similar)")
register_metric(LPIPS)


__all__ = ["BACKBONE_URLS", "LPIPS", "LPIPSConfig", "LPIPSNet", "LPIPSScorer", "backbone_features",
           "backbone_state_shapes", "load_lpips", "packaged_lin_weights"]
