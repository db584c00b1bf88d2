"""Image metrics of the NVS papers on torchmetrics: PSNR, SSIM, LPIPS, FID and KID.

Conventions (those of pixelNeRF / 3DiM / DFM evaluations):

- inputs are ``[N, 3, H, W]`` (or ``[B, V, 3, H, W]``) in [-1, 1], clamped, then mapped to [0, 1];
- PSNR is computed per image (``data_range=1``) and *averaged over images* (not the PSNR of the
  pooled MSE); SSIM per image in the convention of Wang et al. 2004 / ``tf.image.ssim`` (11x11 Gaussian
  window, sigma 1.5, K1 0.01, K2 0.03, population statistics, averaged over the valid region and the
  channels) and averaged over images; LPIPS per image (AlexNet by default, inputs in [-1, 1]) and averaged;
- FID / KID on Inception-v3 pool features (2048-d by default) of the *generated* views against the
  *ground-truth target* views, images quantised to uint8 and resized to 299 the way torch-fidelity does
  (TF1-compatible bilinear), i.e. the standard ``pt_inception-2015-12-05`` feature extractor.

Weights are only ever read from local files (the ``$TORCH_HOME/hub/checkpoints`` cache or a configured
path); nothing downloads at run time (`no_downloads` turns any attempt into a `MissingWeightsError`).
A missing file raises `MissingWeightsError` naming the file, where it goes and how to get it. Each
metric is switched off by leaving it out of ``metrics``.

The feature networks (Inception, LPIPS) are held *outside* the module tree: they never enter a
LightningModule's ``state_dict``/checkpoint or parameter count, and they follow the device of the
images passed to `NVSMetrics.update`. The accumulators are torchmetrics ``Metric`` objects, so
``compute()`` synchronises them across DDP processes (call it on every rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.image import FrechetInceptionDistance, PeakSignalNoiseRatio
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "MetricsConfig",
    "NVSMetrics",
    "MissingWeightsError",
    "InceptionFID",
    "InceptionKID",
    "SSIM",
    "ssim",
    "psnr_per_image",
    "WeightsSpec",
    "INCEPTION_WEIGHTS",
    "LPIPS_BACKBONE_WEIGHTS",
    "weights_dir",
    "resolve_weights",
    "no_downloads",
    "build_inception",
    "build_lpips",
    "to_unit",
    "to_uint8",
]

ALL_METRICS = ("psnr", "ssim", "lpips", "fid", "kid")
DEFAULT_METRICS = ALL_METRICS
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fid": False, "kid": False}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a metric needs are not on this machine (genvs never downloads them)."""


@dataclass(frozen=True)
class WeightsSpec:
    """A weights file: accepted file names in the cache, where to get it, what it is for."""

    filenames: tuple[str, ...]
    url: str
    what: str
    metric: str
    config_key: str


INCEPTION_WEIGHTS = WeightsSpec(
    # torch-fidelity's conversion of the TF 2015-12-05 Inception graph; pytorch-fid's file of the same
    # graph is accepted too (it is loaded strictly, so a file with other keys is rejected, not misused).
    filenames=("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    what="Inception-v3 FID weights (pt_inception-2015-12-05, as used by torch-fidelity / pytorch-fid)",
    metric="fid/kid",
    config_key="inception_weights",
)
LPIPS_BACKBONE_WEIGHTS = {
    "alex": WeightsSpec(
        filenames=("alexnet-owt-7be5be79.pth",),
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        what="torchvision ImageNet AlexNet weights (LPIPS backbone)",
        metric="lpips",
        config_key="lpips_backbone_weights",
    ),
    "vgg": WeightsSpec(
        filenames=("vgg16-397923af.pth",),
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        what="torchvision ImageNet VGG16 weights (LPIPS backbone)",
        metric="lpips",
        config_key="lpips_backbone_weights",
    ),
}


# ------------------------------------------------------------------------------- weight files
def weights_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's download cache; ``~/.cache/torch`` when unset)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fix_text(spec: WeightsSpec, dest: Path) -> str:
    return (
        f"To fix, on a machine with internet download\n    {spec.url}\n"
        f"and copy it to\n    {dest}\n"
        f"(e.g. `curl -L --create-dirs -o {dest} {spec.url}`), or set `{spec.config_key}: /path/to/{spec.filenames[0]}` "
        f"in the metrics config, or point TORCH_HOME at a directory whose hub/checkpoints/ holds it. "
        f"To run without this metric, remove {' and '.join(repr(m) for m in spec.metric.split('/'))} from `metrics`."
    )


def resolve_weights(spec: WeightsSpec, configured: str | os.PathLike | None = None) -> Path:
    """Path of a local weights file: the configured path if given, else the first cached file name.

    Raises `MissingWeightsError` naming the file, where it is expected and how to get it.
    """
    if configured is not None:
        p = Path(configured).expanduser()
        if p.is_file():
            return p
        raise MissingWeightsError(
            f"{spec.metric.upper()} needs the {spec.what}, but the configured path "
            f"`{spec.config_key}: {configured}` is not a file. genvs never downloads weights at run time.\n"
            + _fix_text(spec, p)
        )
    cache = weights_dir()
    for name in spec.filenames:
        if (cache / name).is_file():
            return cache / name
    dest = cache / spec.filenames[0]
    torch_home = os.environ.get("TORCH_HOME")
    where = f"TORCH_HOME={torch_home}" if torch_home else "TORCH_HOME is unset, so torch's default cache is used"
    raise MissingWeightsError(
        f"{spec.metric.upper()} needs the {spec.what}: file {spec.filenames[0]!r} was not found at {dest} "
        f"({where}). genvs never downloads weights at run time.\n" + _fix_text(spec, dest)
    )


def _load_state_dict(path: Path, spec: WeightsSpec) -> dict[str, Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a tensor dict
        raise MissingWeightsError(
            f"Could not read the {spec.what} from {path}: {type(e).__name__}: {e}\n"
            f"The file is corrupt or not a plain state dict. " + _fix_text(spec, path)
        ) from e
    if not isinstance(sd, Mapping):
        raise MissingWeightsError(f"{path} does not hold a state dict (got {type(sd).__name__}). " + _fix_text(spec, path))
    return dict(sd)


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Turn any download through ``torch.hub`` (used by torchvision, torch-fidelity, lpips) into an error."""

    def _blocked(url, dst, *args, **kwargs):
        raise MissingWeightsError(
            f"genvs blocked a download of {url} (to {dst}): metric weights are read from local files only. "
            f"Download it on a machine with internet and copy it to {dst}."
        )

    with mock.patch("torch.hub.download_url_to_file", _blocked):
        yield


# ----------------------------------------------------------------------------- feature networks
def build_inception(feature_dim: int = 2048, weights: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with weights from a local file, in eval mode.

    Input uint8 ``[N, 3, H, W]``; output a 1-tuple with ``[N, feature_dim]`` features.
    """
    if feature_dim not in (64, 192, 768, 2048):
        raise ValueError(f"fid_feature_dim must be one of 64, 192, 768, 2048 (Inception pool layers), got {feature_dim}")
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    path = resolve_weights(INCEPTION_WEIGHTS, weights)
    sd = _load_state_dict(path, INCEPTION_WEIGHTS)
    # torch-fidelity loads its weights inside __init__ (from a URL when no path is given, with a
    # full-pickle torch.load otherwise); hand it the state dict we read with weights_only=True instead.
    with no_downloads(), mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: sd):
        try:
            net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", [str(feature_dim)])
        except RuntimeError as e:
            raise MissingWeightsError(
                f"{path} is not a compatible Inception-v3 FID state dict ({str(e).splitlines()[0]}). "
                + _fix_text(INCEPTION_WEIGHTS, path)
            ) from e
    return net.eval().requires_grad_(False)


def _lpips_linear_default() -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1"


def build_lpips(
    net: str = "alex", backbone_weights: str | os.PathLike | None = None, linear_weights: str | os.PathLike | None = None
) -> nn.Module:
    """``lpips.LPIPS`` (v0.1) with its backbone and linear layers read from local files, in eval mode.

    The linear-layer weights ship inside the ``lpips`` package (``lpips/weights/v0.1/<net>.pth``); the
    ImageNet backbone is torchvision's checkpoint, looked up in ``$TORCH_HOME/hub/checkpoints``.
    Call as ``lpips_net(x, y)`` with ``[N, 3, H, W]`` in [-1, 1] -> ``[N, 1, 1, 1]``.
    """
    if net not in LPIPS_BACKBONE_WEIGHTS:
        raise ValueError(f"lpips_net must be one of {sorted(LPIPS_BACKBONE_WEIGHTS)}, got {net!r}")
    import lpips

    spec = LPIPS_BACKBONE_WEIGHTS[net]
    bb_path = resolve_weights(spec, backbone_weights)
    lin_spec = WeightsSpec(
        filenames=(f"{net}.pth",),
        url=f"https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{net}.pth",
        what=f"LPIPS v0.1 linear-layer weights for {net} (shipped in the `lpips` package)",
        metric="lpips",
        config_key="lpips_linear_weights",
    )
    lin_path = Path(linear_weights) if linear_weights is not None else _lpips_linear_default() / f"{net}.pth"
    if not lin_path.is_file():
        raise MissingWeightsError(
            f"LPIPS needs the {lin_spec.what}, not found at {lin_path}. Reinstall `lpips` (pip install lpips>=0.1.4) "
            "or " + _fix_text(lin_spec, lin_path)
        )
    with no_downloads(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation warnings for lpips' `pretrained=False`
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    # backbone: lpips splits torchvision's `features` into slices keeping the layer indices
    bb = _load_state_dict(bb_path, spec)
    want = model.net.state_dict()
    mapped = {}
    for k in want:
        src = "features." + k.split(".", 1)[1]  # slice2.3.weight -> features.3.weight
        if src not in bb or bb[src].shape != want[k].shape:
            raise MissingWeightsError(
                f"{bb_path} is not a torchvision {net} checkpoint (missing or mismatched {src!r}). " + _fix_text(spec, bb_path)
            )
        mapped[k] = bb[src]
    model.net.load_state_dict(mapped, strict=True)
    lin = _load_state_dict(lin_path, lin_spec)
    lin_keys = [k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")]
    bad = [k for k in lin_keys if k not in lin or lin[k].shape != model.state_dict()[k].shape]
    if bad:
        raise MissingWeightsError(f"{lin_path} is not an LPIPS {net} linear-layer file (missing {bad}). " + _fix_text(lin_spec, lin_path))
    model.load_state_dict({k: lin[k] for k in lin_keys}, strict=False)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------- PSNR
def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR (dB) of every image of ``[..., C, H, W]`` images in [0, 1], shape ``[...]`` (the MSE floored at
    1e-10, so identical images give 100 dB); NVSMetrics' PSNR is their mean."""
    mse = (pred.float() - target.float()).square().flatten(-3).mean(-1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


# ------------------------------------------------------------------------------------- SSIM
def ssim(
    pred: Tensor, target: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> Tensor:
    """Per-image SSIM ``[N]`` of ``[N, C, H, W]`` images (Wang et al. 2004, as ``tf.image.ssim``).

    Gaussian ``window`` x ``window`` weights (``sigma``), population (co)variances, the SSIM map over the
    *valid* region (no padding) averaged over pixels and channels. (torchmetrics' SSIM averages over a
    reflect-padded full image instead, which differs by ~1e-2 at 32 px, so it is not used here.)
    """
    N, C, H, W = pred.shape
    if H < window or W < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {H}x{W}")
    x, y = pred.double(), target.double()  # float64: E[x^2] - E[x]^2 cancels badly in float32
    r = torch.arange(window, device=x.device, dtype=x.dtype) - (window - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    stats = torch.cat([x, y, x * x, y * y, x * y])  # [5N, C, H, W]
    # separable valid convolution with the Gaussian
    stats = F.conv2d(stats, g.view(1, 1, window, 1).expand(C, 1, window, 1), groups=C)
    stats = F.conv2d(stats, g.view(1, 1, 1, window).expand(C, 1, 1, window), groups=C)
    mx, my, exx, eyy, exy = stats.split(N)
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


class SSIM(Metric):
    """Mean over images of `ssim` (images in [0, 1]); sum/count states, so DDP reduction is exact."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, data_range: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.data_range = data_range
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        v = ssim(pred, target, self.data_range)
        self.total += v.sum()
        self.count += v.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


# ------------------------------------------------------------------------ FID / KID on features
class _Precomputed(nn.Module):
    """Feature 'extractor' for torchmetrics FID/KID that receives features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x.double()


class InceptionFID(FrechetInceptionDistance):
    """torchmetrics FID fed with precomputed features ``update(features [N, D], real: bool)``.

    Returns NaN (with a note in ``.notes``) instead of raising when fewer than 2 samples are present,
    and notes when there are fewer samples than feature dimensions (FID is then strongly biased).
    """

    def __init__(self, num_features: int = 2048, **kwargs):
        super().__init__(feature=_Precomputed(num_features), **kwargs)
        self.num_features = num_features
        self.orig_dtype = torch.float64
        self.notes: list[str] = []

    def compute(self) -> Tensor:
        self.notes = []
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if min(n_real, n_fake) < 2:
            self.notes.append(f"FID is undefined with {n_real} real / {n_fake} generated images (needs >= 2 each); reported as NaN.")
            return torch.tensor(float("nan"), dtype=torch.float64)
        if min(n_real, n_fake) < self.num_features:
            self.notes.append(
                f"FID from {n_real} real / {n_fake} generated images with {self.num_features}-d features: fewer samples than "
                "dimensions, the covariances are rank-deficient and FID is biased upwards; compare only at equal sample counts."
            )
        return super().compute()


class InceptionKID(Metric):
    """Kernel Inception Distance on precomputed features (``update(features [N, D], real: bool)``).

    The unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3`` averaged over
    ``subsets`` random subsets of ``subset_size`` (torch-fidelity's defaults 100 x 1000), using
    torchmetrics' ``poly_mmd``. With fewer samples the subset size shrinks to the sample count (noted in
    ``.notes``) instead of failing. Subsets are drawn from a private generator seeded with ``seed``, so
    the value is deterministic and the global RNG is untouched. ``compute()`` returns ``(mean, std)``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, degree: int = 3, coef: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if subsets < 1 or subset_size < 2:
            raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
        self.subsets, self.subset_size, self.degree, self.coef, self.seed = subsets, subset_size, degree, coef, seed
        self.notes: list[str] = []
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features.double())

    def compute(self) -> tuple[Tensor, Tensor]:
        self.notes = []
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        real = dim_zero_cat(self.real_features) if len(self.real_features) else None
        fake = dim_zero_cat(self.fake_features) if len(self.fake_features) else None
        n_real = 0 if real is None else real.shape[0]
        n_fake = 0 if fake is None else fake.shape[0]
        m = min(self.subset_size, n_real, n_fake)
        if m < 2:
            self.notes.append(f"KID is undefined with {n_real} real / {n_fake} generated images (needs >= 2 each); reported as NaN.")
            return nan, nan
        if m < self.subset_size:
            self.notes.append(
                f"KID subset size reduced from {self.subset_size} to {m} because only {n_real} real / {n_fake} generated "
                "images were given; KID from different subset sizes is not directly comparable."
            )
        gen = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            r = real[torch.randperm(n_real, generator=gen)[:m].to(real.device)]
            f = fake[torch.randperm(n_fake, generator=gen)[:m].to(fake.device)]
            scores.append(poly_mmd(r, f, degree=self.degree, gamma=None, coef=self.coef))
        s = torch.stack(scores)
        return s.mean(), s.std(unbiased=False)


# ----------------------------------------------------------------------------- conversions
def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] float32 (clamped)."""
    return (x.float().clamp(-1, 1) + 1) / 2


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 by rounding, as when saving the image as PNG."""
    return (to_unit(x) * 255 + 0.5).floor().to(torch.uint8)


# ------------------------------------------------------------------------------ the metric set
@dataclass
class MetricsConfig:
    """What to compute and where the weights are. Leave a metric out of ``metrics`` to switch it off."""

    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    fid_feature_dim: int = 2048  # Inception pool features: 64, 192, 768 or 2048 (the standard)
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # shrinks to the sample count when fewer images (with a note)
    kid_seed: int = 0
    inception_weights: str | None = None  # default: $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth
    lpips_net: str = "alex"  # "alex" (standard) or "vgg"
    lpips_backbone_weights: str | None = None  # default: $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth
    lpips_linear_weights: str | None = None  # default: the file shipped in the lpips package
    feature_batch_size: int = 50  # images per Inception / LPIPS forward

    def __post_init__(self) -> None:
        self.metrics = [m.lower() for m in self.metrics]
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"Unknown metric(s) {unknown} in `metrics`; choose from {list(ALL_METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"`metrics` lists a metric twice: {self.metrics}")


class NVSMetrics(nn.Module):
    """PSNR / SSIM / LPIPS / FID / KID of generated views against ground truth, DDP-ready.

    ``NVSMetrics(config=None, **overrides)``: ``config`` is a `MetricsConfig` (or a dict of its fields);
    keyword overrides replace fields, e.g. ``NVSMetrics(metrics=["psnr", "ssim"])``. Feature networks
    are built (and weights checked) here, so a missing file fails at construction, not mid-test.

    ``update(pred, target)``: ``[N, 3, H, W]`` or ``[B, V, 3, H, W]`` in [-1, 1]; runs in fp32 with
    autocast disabled. ``compute() -> dict[str, float]`` with the enabled metrics among
    ``psnr, ssim, lpips, fid, kid, kid_std`` plus ``num_images``; call it on every DDP rank.
    ``notes`` lists caveats of the last compute (small-sample FID/KID); they are also warned on rank 0.
    """

    def __init__(self, config: MetricsConfig | Mapping | None = None, **overrides):
        super().__init__()
        if isinstance(config, Mapping):
            config = MetricsConfig(**config)
        cfg = dataclasses.replace(config or MetricsConfig(), **overrides)
        self.config = cfg
        self.notes: list[str] = []
        names = cfg.metrics
        m: dict[str, Metric] = {"num_images": SumMetric()}
        if "psnr" in names:
            m["psnr"] = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
        if "ssim" in names:
            m["ssim"] = SSIM(data_range=1.0)
        if "lpips" in names:
            m["lpips"] = MeanMetric()
        if "fid" in names:
            m["fid"] = InceptionFID(cfg.fid_feature_dim)
        if "kid" in names:
            m["kid"] = InceptionKID(subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size, seed=cfg.kid_seed)
        self.metrics = nn.ModuleDict(m)
        # Feature networks: plain attributes (not submodules) so they stay out of state_dict / checkpoints.
        self._nets: dict[str, nn.Module] = {}
        if "fid" in names or "kid" in names:
            self._nets["inception"] = build_inception(cfg.fid_feature_dim, cfg.inception_weights)
        if "lpips" in names:
            self._nets["lpips"] = build_lpips(cfg.lpips_net, cfg.lpips_backbone_weights, cfg.lpips_linear_weights)

    @property
    def names(self) -> list[str]:
        return list(self.config.metrics)

    def _net(self, name: str, device: torch.device) -> nn.Module:
        net = self._nets[name]
        p = next(net.parameters())
        if p.device != device:
            net = self._nets[name] = net.to(device)
        return net

    @torch.no_grad()
    def inception_features(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [-1, 1] -> ``[N, fid_feature_dim]`` float64 Inception features."""
        net = self._net("inception", images.device)
        x = to_uint8(images)
        bs = self.config.feature_batch_size
        return torch.cat([net(x[i : i + bs])[0].double() for i in range(0, x.shape[0], bs)])

    @torch.no_grad()
    def lpips_scores(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-image LPIPS ``[N]`` of ``[N, 3, H, W]`` images in [-1, 1]."""
        net = self._net("lpips", pred.device)
        p, t = pred.float().clamp(-1, 1).contiguous(), target.float().clamp(-1, 1).contiguous()
        bs = self.config.feature_batch_size
        return torch.cat([net(p[i : i + bs], t[i : i + bs]).flatten() for i in range(0, p.shape[0], bs)])

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate generated ``pred`` against ground-truth ``target`` (same shape, in [-1, 1])."""
        if pred.dim() == 5:
            pred = pred.flatten(0, 1)
        if target.dim() == 5:
            target = target.flatten(0, 1)
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"NVSMetrics.update expects pred and target of the same shape [N, 3, H, W] (or [B, V, 3, H, W]) "
                f"in [-1, 1], got {list(pred.shape)} and {list(target.shape)}"
            )
        if not (torch.isfinite(pred).all() and torch.isfinite(target).all()):
            raise ValueError("NVSMetrics.update: pred or target contains NaN or Inf")
        with torch.autocast(pred.device.type, enabled=False):
            self.metrics["num_images"].update(torch.tensor(float(pred.shape[0]), device=pred.device))
            p01, t01 = to_unit(pred), to_unit(target)
            if "psnr" in self.metrics:
                self.metrics["psnr"].update(p01, t01)
            if "ssim" in self.metrics:
                self.metrics["ssim"].update(p01, t01)
            if "lpips" in self.metrics:
                self.metrics["lpips"].update(self.lpips_scores(pred, target))
            if "fid" in self.metrics or "kid" in self.metrics:
                f_fake, f_real = self.inception_features(pred), self.inception_features(target)
                for k in ("fid", "kid"):
                    if k in self.metrics:
                        self.metrics[k].update(f_real, real=True)
                        self.metrics[k].update(f_fake, real=False)

    def forward(self, pred: Tensor, target: Tensor) -> None:
        self.update(pred, target)

    def compute(self) -> dict[str, float]:
        """Synchronise across processes and return ``{metric: value}`` (plus ``kid_std``, ``num_images``)."""
        with warnings.catch_warnings():  # torchmetrics warns when a rank had no update; the check below covers it
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            n = int(self.metrics["num_images"].compute())
        if n == 0:
            raise RuntimeError("NVSMetrics.compute() called before any update(pred, target)")
        out: dict[str, float] = {}
        self.notes = []
        for k in ("psnr", "ssim", "lpips", "fid"):
            if k in self.metrics:
                out[k] = float(self.metrics[k].compute())
        if "kid" in self.metrics:
            mean, std = self.metrics["kid"].compute()
            out["kid"], out["kid_std"] = float(mean), float(std)
        for k in ("fid", "kid"):
            if k in self.metrics:
                self.notes.extend(self.metrics[k].notes)
        for note in dict.fromkeys(self.notes):
            rank_zero_warn(note, UserWarning)
        out["num_images"] = float(n)
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        self.notes = []

    def extra_repr(self) -> str:
        return f"metrics={self.names}, fid_feature_dim={self.config.fid_feature_dim}"
