"""FID with the TensorFlow-ported Inception-v3 of pytorch-fid, in pure torch.

The SoftREPA authors compute FID with `pytorch_fid.fid_score.calculate_fid_given_paths(
[generated, coco_val2017_resized], batch 50, dims 2048)`. pytorch-fid, torch-fidelity and clean-fid
all import torchvision at import time (which does not import beside our CPU torch build), and
torchmetrics' FID needs torch-fidelity's extractor. So the network is defined here: torchvision's
`Inception3` layout (`Conv2d_1a_3x3` ... `Mixed_7c`, `fc` with 1008 classes) with pytorch-fid's
FID patches (average pools that exclude padding; max pool in the last block), whose state-dict
keys are those of the published `pt_inception-2015-12-05-6726825d.pth` (the same file torch-fidelity
ships as `weights-inception-2015-12-05-6726825d.pth`). `fid_inception_state_shapes` is that key ->
shape table, written from the block specification; tests load it with strict=True.

Features follow pytorch-fid exactly: RGB in [0, 1] -> bilinear resize to 299 (align_corners=False,
no antialias) -> 2x - 1 -> network -> global average pool (2048-d). The Fréchet distance is
computed in float64 with symmetric eigendecompositions (`frechet_from_stats`), which agrees with
scipy's `sqrtm` formula of pytorch-fid to round-off and needs no scipy.

The metrics.yaml section is `FIDConfig`; the spec `FID` (kind `PER_SET`: `FIDFeatures.features`
per batch, `FIDFeatures.statistic` once against the reference folder's features or a pytorch-fid
.npz) is declared and registered at the end of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import MetricError, check_keys, load_state_dict, resolve_file, to_tensor
from .spec import MetricConfig, MetricKind, MetricSpec, optional, register_metric

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, as torchvision's Inception."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TensorFlow's average pool ignores the zero padding (pytorch-fid's "FID patch").
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), b3,
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """`pool="avg"`: pytorch-fid's FIDInceptionE_1; `pool="max"`: FIDInceptionE_2 (TF graph quirk)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's `fid_inception_v3()` network; `forward` returns the 2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # unused by FID; present in the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 299, 299) in [-1, 1] -> (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def fid_inception_state_shapes(with_num_batches_tracked: bool = True) -> dict[str, tuple]:
    """Key -> shape of the published pytorch-fid Inception checkpoint, from the block specification.

    Args:
        with_num_batches_tracked: include the BatchNorm counters (files saved by torch >= 0.4.1).
    """
    convs = {"Conv2d_1a_3x3": (3, 32, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (32, 64, 3, 3),
             "Conv2d_3b_1x1": (64, 80, 1, 1), "Conv2d_4a_3x3": (80, 192, 3, 3)}

    def block_a(n, cin, pf):
        return {f"{n}.branch1x1": (cin, 64, 1, 1), f"{n}.branch5x5_1": (cin, 48, 1, 1),
                f"{n}.branch5x5_2": (48, 64, 5, 5), f"{n}.branch3x3dbl_1": (cin, 64, 1, 1),
                f"{n}.branch3x3dbl_2": (64, 96, 3, 3), f"{n}.branch3x3dbl_3": (96, 96, 3, 3),
                f"{n}.branch_pool": (cin, pf, 1, 1)}

    def block_c(n, c7):
        return {f"{n}.branch1x1": (768, 192, 1, 1), f"{n}.branch7x7_1": (768, c7, 1, 1),
                f"{n}.branch7x7_2": (c7, c7, 1, 7), f"{n}.branch7x7_3": (c7, 192, 7, 1),
                f"{n}.branch7x7dbl_1": (768, c7, 1, 1), f"{n}.branch7x7dbl_2": (c7, c7, 7, 1),
                f"{n}.branch7x7dbl_3": (c7, c7, 1, 7), f"{n}.branch7x7dbl_4": (c7, c7, 7, 1),
                f"{n}.branch7x7dbl_5": (c7, 192, 1, 7), f"{n}.branch_pool": (768, 192, 1, 1)}

    def block_e(n, cin):
        return {f"{n}.branch1x1": (cin, 320, 1, 1), f"{n}.branch3x3_1": (cin, 384, 1, 1),
                f"{n}.branch3x3_2a": (384, 384, 1, 3), f"{n}.branch3x3_2b": (384, 384, 3, 1),
                f"{n}.branch3x3dbl_1": (cin, 448, 1, 1), f"{n}.branch3x3dbl_2": (448, 384, 3, 3),
                f"{n}.branch3x3dbl_3a": (384, 384, 1, 3), f"{n}.branch3x3dbl_3b": (384, 384, 3, 1),
                f"{n}.branch_pool": (cin, 192, 1, 1)}

    convs |= block_a("Mixed_5b", 192, 32) | block_a("Mixed_5c", 256, 64) | block_a("Mixed_5d", 288, 64)
    convs |= {"Mixed_6a.branch3x3": (288, 384, 3, 3), "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
              "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)}
    convs |= block_c("Mixed_6b", 128) | block_c("Mixed_6c", 160) | block_c("Mixed_6d", 160) | block_c("Mixed_6e", 192)
    convs |= {"Mixed_7a.branch3x3_1": (768, 192, 1, 1), "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
              "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
              "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)}
    convs |= block_e("Mixed_7b", 1280) | block_e("Mixed_7c", 2048)
    out: dict[str, tuple] = {}
    for name, (cin, cout, kh, kw) in convs.items():
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for b in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{b}"] = (cout,)
        if with_num_batches_tracked:
            out[f"{name}.bn.num_batches_tracked"] = ()
    out["fc.weight"], out["fc.bias"] = (1008, 2048), (1008,)
    return out


class FIDFeatures:
    """Inception pool3 features of images, pytorch-fid preprocessing.

    Args:
        model: `FIDInceptionV3` (or, for plumbing tests only, any module mapping (B, 3, 299, 299)
            in [-1, 1] to (B, D)).
        device, dtype: where / how the model runs.
        label: what the features are, recorded in results.json.
    """

    name = "fid"
    #: What `--reference` must be (for the message when it is missing).
    reference_help = "a folder of real images or a pytorch-fid .npz of mu/sigma"
    #: A reference file with one of these suffixes holds statistics, not images (`load_stats`).
    statistics_suffixes = (".npz",)

    def __init__(self, model: nn.Module, *, device="cpu", dtype=torch.float32,
                 label: str = "pytorch-fid Inception-v3 pool3 (2048-d)"):
        self.model, self.device, self.dtype = model.to(device, dtype).eval(), torch.device(device), dtype
        self.label = label

    def info(self) -> dict[str, Any]:
        """What results.json records about the extractor."""
        return {"features": self.label}

    def statistic(self, features: np.ndarray, reference: "np.ndarray | Path") -> tuple[float, dict[str, Any]]:
        """FID of the generated features against the reference, and which computation ran.

        Args:
            features: (N, D) features of the generated images.
            reference: (M, D) features of the reference images (`fid_with_path`: the exact
                low-rank path when both sets have fewer images than dimensions, else the D x D
                eigen path), or a pytorch-fid .npz of mu / sigma (only the eigen path applies).
        Returns:
            (FID, {"fid_path", "fid_path_note"}).
        """
        if isinstance(reference, (str, Path)):
            path = fid_path(len(features), None, features.shape[1])
            value = frechet_from_stats(*feature_stats(features), *load_stats(reference))
        else:
            value, path = fid_with_path(features, reference)
        return value, {"fid_path": path, "fid_path_note": FID_PATHS[path]}

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """(B, D) float64 features of a batch of PIL images."""
        # Resized one by one: pytorch-fid interpolates whole same-size batches, which is the same op.
        x = torch.cat([F.interpolate(to_tensor(im)[None], size=(299, 299), mode="bilinear", align_corners=False)
                       for im in images])
        return self.model((2 * x - 1).to(self.device, self.dtype)).double().cpu().numpy()


def load_fid(cfg: "FIDConfig | dict", *, device="cpu", dtype=torch.float32, offline=True) -> FIDFeatures:
    """FID features from `cfg` (`FIDConfig`: weights = pt_inception-2015-12-05-6726825d.pth, file or folder).

    `test_only_random_features: true` swaps in a tiny seeded random conv net: a plumbing aid for
    tests; its numbers are not FID and are labelled so in the results.
    """
    cfg = FIDConfig.coerce(cfg, metric="fid")
    if cfg.test_only_random_features:
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
            torch.manual_seed(0)
            net = nn.Sequential(nn.AvgPool2d(23), nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                nn.Flatten())
        return FIDFeatures(net, device=device, dtype=dtype, label="TEST-ONLY random conv features (not FID)")
    path = resolve_file(cfg.weights, metric="fid", what="FID Inception weights", filename=cfg.filename,
                        url=FID_WEIGHTS_URL, offline=offline)
    sd = load_state_dict(path, metric="fid")
    model = FIDInceptionV3()
    for k, v in model.state_dict().items():  # older files lack the BatchNorm counters (unused at eval)
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    check_keys(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, metric="fid", path=path)
    model.load_state_dict(sd, strict=True)
    return FIDFeatures(model, device=device, dtype=dtype)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), float64.

    tr sqrt(S1 S2) equals tr sqrt(S1^1/2 S2 S1^1/2) (similar matrices); the symmetric form only
    needs `eigh`, so it stays real and stable for the singular covariances of few samples.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise MetricError(f"FID statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    r = _sqrt_psd(s1)
    mid = r @ s2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, N >= 2 (pytorch-fid: np.cov with rowvar=False)."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise MetricError(f"FID needs at least 2 images per set, got features of shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two (N, D) feature sets.

    With fewer images than feature dimensions (e.g. 500 images of 2048-d Inception features)
    the covariances have rank < N and the D x D eigen-decompositions are wasted work: the same
    number follows exactly from the N1 x N2 cross-Gram matrix (`_fid_low_rank`), which is what
    we use then. Both paths are compared on random features in the tests.
    """
    return fid_with_path(a, b)[0]


#: `fid_with_path`'s path names, as recorded in results.json ("fid_path").
FID_PATHS = {"low_rank": "exact low-rank (N1 x N2 cross-Gram SVD; both sets have fewer images than dimensions)",
             "eigen": "D x D covariances, symmetric eigen square root"}


def fid_path(n1: int, n2: int | None, dim: int) -> str:
    """Which FID computation runs: "low_rank" when both sets have fewer images than `dim`, else "eigen".

    Args:
        n1, n2: images per set; `n2` None when the reference is given as statistics (mu, sigma),
            which only the eigen path can use.
        dim: feature dimension (2048 for Inception pool3).
    """
    return "low_rank" if n2 is not None and max(n1, n2) < dim else "eigen"


def fid_with_path(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """FID between two (N, D) feature sets and the path that computed it (`fid_path`)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for x in (a, b):
        if x.ndim != 2 or len(x) < 2:
            raise MetricError(f"FID needs at least 2 images per set, got features of shape {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"FID features differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    path = fid_path(len(a), len(b), a.shape[1])
    if path == "low_rank":
        return _fid_low_rank(a, b), path
    return frechet_from_stats(*feature_stats(a), *feature_stats(b)), path


def _fid_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """Exact FID through the cross-Gram matrix, O(N1 N2 D) instead of O(D^3).

    With centred X1 (N1, D), X2 (N2, D): S_k = X_k^T X_k / (N_k - 1). The non-zero eigenvalues
    of S1 S2 are those of C C^T with C = X1 X2^T / sqrt((N1 - 1)(N2 - 1)) (N1, N2), so
    tr sqrt(S1 S2) is the sum of C's singular values, and tr S_k = ||X_k||_F^2 / (N_k - 1).
    """
    x1, x2 = a - a.mean(0), b - b.mean(0)  # (N1, D), (N2, D)
    n1, n2 = len(a) - 1, len(b) - 1
    c = (x1 @ x2.T) / np.sqrt(n1 * n2)  # (N1, N2)
    tr_covmean = np.linalg.svd(c, compute_uv=False).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(max(mean_term + (x1 ** 2).sum() / n1 + (x2 ** 2).sum() / n2 - 2 * tr_covmean, 0.0))


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid `.npz` statistics file (`--save-stats`)."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise MetricError(f"{path}: FID statistics need arrays 'mu' and 'sigma'")
        return f["mu"], f["sigma"]


@dataclass(frozen=True)
class FIDConfig(MetricConfig):
    """metrics.yaml `fid`: pytorch-fid's Inception weights (not on the hub: a local file or folder).

    Args:
        weights: the .pth file or the folder holding `filename`.
        filename: the file inside a folder.
        test_only_random_features: a seeded random conv net instead (plumbing tests only).
    """

    weights: str | None = None
    filename: str | None = "pt_inception-2015-12-05-6726825d.pth"
    test_only_random_features: bool = optional(False)


FID = MetricSpec(name="fid", kind=MetricKind.PER_SET, loader=load_fid, config=FIDConfig, higher_is_better=False,
                 note="FID vs the reference set (lower = closer)")
register_metric(FID)


__all__ = ["FID", "FIDConfig", "FIDFeatures", "FIDInceptionV3", "FID_PATHS", "FID_WEIGHTS_URL", "feature_stats",
           "fid_from_features", "fid_inception_state_shapes", "fid_path", "fid_with_path", "frechet_from_stats",
           "load_fid", "load_stats"]
