"""An offline quality judge for the toy data set (`dit.data.toy`): a small CNN classifier.

Inception features and ImageNet reference statistics need downloads and say little about 32x32
coloured shapes, so the quickstart is scored by a classifier the project trains itself on real
toy images, in seconds on a CPU. It answers two questions about generated samples:

- class accuracy: is a sample conditioned on class y classified as y? (chance is 10 %)
- Frechet distance in its feature space (the globally pooled last convolution) between
  generated and real images: FID's formula (`dit.scoring.metrics.frechet_distance`) with this judge in
  place of Inception (`JudgeFeatures`, used by `eval_fid.py feature_extractor=toy_judge`).

The trained weights are cached in a file keyed by every setting that affects them, so the
judge is trained once per machine and identical across runs with the same seed. Each toy variant
(`dit.data.toy.VARIANTS`) has its own judge (`variant=`): one trained on the colour-coded set has learnt
colours, and cannot judge the shape-only set, whose colours say nothing about the class.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from dit.io.checkpoint import save_atomic
from dit.io.images import check_images
from dit.data.toy import DATA_VERSION, NUM_CLASSES, check_variant, make_toy_arrays, to_model_range

FORMAT_VERSION = 1
# The judge trains on its own images: a data seed far from the ones a training run uses, so
# the judge has not seen the exact images a diffusion model was trained on.
_JUDGE_DATA_SEED_OFFSET = 1_000_003
# Settings that differ from JudgeSettings' defaults per toy variant: outlines are harder to learn
# than colours (measured at 16 px: 200 steps reach 47 % held-out accuracy on the shape-only set,
# 2000 steps on 5000 images 92 %, in about 17 s on one CPU thread).
VARIANT_SETTINGS = {"colours": {}, "shapes": {"steps": 2000, "num_per_class": 500}}
BATCH_SIZE = 500  # images per forward pass when judging (a CPU-sized batch of 32x32 images)


@dataclass(frozen=True)
class JudgeSettings:
    """Everything that determines the judge's weights (and so its cache key)."""

    image_size: int = 32
    seed: int = 0
    num_per_class: int = 200  # real training images per class
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 16  # channels of the first conv; doubled twice
    noise_std: float = 0.15  # max std of the additive noise augmentation, in [-1, 1] units
    version: int = FORMAT_VERSION
    data_version: int = DATA_VERSION  # the toy images it learns from
    variant: str = "colours"  # which toy set (dit.data.toy.VARIANTS) it learns and judges

    def record(self) -> dict:
        """The settings as stored in a cache file and hashed into its name. The default variant
        is left out, so the colour set's judges keep the names (and files) they had before the
        shape-only set existed."""
        d = asdict(self)
        if d["variant"] == "colours":
            del d["variant"]
        return d

    def cache_name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:10]
        tag = "" if self.variant == "colours" else f"_{self.variant}"
        return f"toy_judge{tag}_{self.image_size}px_seed{self.seed}_{digest}.pt"


class JudgeNet(nn.Module):
    """Three 3x3 conv stages (width, 2*width, 4*width channels; max-pool between), global average
    pooling to the feature vector, one linear layer to the class logits."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (N, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes)


def _augment(x: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Random flips (every class is closed under them up to rotation) and additive Gaussian
    noise of a random strength, so slightly noisy generated samples are judged by their shape
    and colour rather than rejected for texture the real images never had."""
    n = x.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    flip_v = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    std = torch.rand(n, 1, 1, 1, generator=generator) * noise_std
    return x + std * torch.randn(x.shape, generator=generator)


def _as_model_input(images_uint8, image_size: int) -> torch.Tensor:
    """Validate uint8 (N, H, W, 3) images (numpy or torch) and map them to (N, 3, H, W) in [-1, 1]."""
    arr = images_uint8.numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if arr.dtype != np.uint8:
        raise TypeError(f"the judge takes uint8 images (N, H, W, 3) in 0..255, got dtype {arr.dtype}; "
                        "convert with clamp(127.5 * x + 128, 0, 255).to(torch.uint8)")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"the judge takes images shaped (N, H, W, 3) (channels last), got {arr.shape}")
    if arr.shape[1:3] != (image_size, image_size):
        raise ValueError(f"this judge was trained on {image_size}x{image_size} images, got "
                         f"{arr.shape[1]}x{arr.shape[2]}: load a judge with image_size={arr.shape[1]}")
    return to_model_range(arr)


def train_judge(settings: JudgeSettings, progress: bool = False) -> tuple[JudgeNet, dict]:
    """Train a judge from scratch on freshly drawn real toy images; returns (net, stats) where
    stats holds its accuracy on held-out real images. Deterministic given `settings`; the
    caller's global torch RNG is left untouched."""
    data_seed = settings.seed + _JUDGE_DATA_SEED_OFFSET
    variant = check_variant(settings.variant)
    images, labels = make_toy_arrays(settings.num_per_class, settings.image_size, data_seed, variant)
    held_images, held_labels = make_toy_arrays(50, settings.image_size, data_seed + 1, variant)
    x_all, y_all = to_model_range(images), torch.from_numpy(labels)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = JudgeNet(settings.width)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.15)
    net.train()
    for _ in tqdm(range(settings.steps), desc="training toy judge", disable=not progress, leave=False):
        idx = torch.randint(len(y_all), (settings.batch_size,), generator=gen)
        loss = F.cross_entropy(net(_augment(x_all[idx], settings.noise_std, gen)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    judge = ToyJudge(net, settings)
    held_acc = float((judge.classify(held_images) == held_labels).mean())
    return net, {"heldout_accuracy": held_acc, "final_loss": float(loss.detach())}


class ToyJudge:
    """A trained `JudgeNet` with uint8 image helpers. Build it with `load_or_train`."""

    def __init__(self, net: JudgeNet, settings: JudgeSettings, stats: dict | None = None):
        self.net = net.eval()
        self.settings = settings
        self.stats = stats or {}

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike | None, image_size: int = 32, seed: int = 0,
                      progress: bool = True, **overrides) -> "ToyJudge":
        """The judge for these settings: loaded from `cache_dir` when a file for exactly these
        settings is there, otherwise trained (seconds on a CPU) and written there atomically.
        `cache_dir=None` trains without caching. `overrides` change other `JudgeSettings`;
        `variant="shapes"` judges the shape-only toy set, with that variant's VARIANT_SETTINGS."""
        variant = check_variant(overrides.pop("variant", "colours"))
        settings = JudgeSettings(image_size=int(image_size), seed=int(seed), variant=variant,
                                 **{**VARIANT_SETTINGS[variant], **overrides})
        path = Path(cache_dir) / settings.cache_name() if cache_dir is not None else None
        if path is not None and path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("settings") != settings.record():
                raise ValueError(f"judge cache {path} holds settings {blob.get('settings')}, expected "
                                 f"{settings.record()}: delete the file to retrain")
            net = JudgeNet(settings.width)
            net.load_state_dict(blob["state_dict"])
            return cls(net, settings, blob.get("stats"))
        net, stats = train_judge(settings, progress=progress)
        if path is not None:
            blob = {"state_dict": net.state_dict(), "settings": settings.record(), "stats": stats,
                    "format_version": FORMAT_VERSION}
            save_atomic(blob, path)  # concurrent runs never see a half-written file
        return cls(net, settings, stats)

    @torch.no_grad()
    def _run(self, images_uint8, fn, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        x = _as_model_input(images_uint8, self.image_size)
        return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else fn(x)

    def logits(self, images_uint8) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, 10)."""
        return self._run(images_uint8, self.net)

    def classify(self, images_uint8) -> np.ndarray:
        """uint8 (N, H, W, 3) -> int64 predicted labels (N,)."""
        return self.logits(images_uint8).argmax(dim=1).numpy()

    def features(self, images_uint8) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, D) features for the Frechet distance."""
        return self._run(images_uint8, self.net.features).double().numpy()


class JudgeFeatures:
    """The judge as a feature extractor for `dit.scoring.metrics`: its pooled features stand in for
    Inception's, its logits give an Inception-Score analogue, and `classify` gives the class
    accuracy of conditional samples."""

    name = "toy_judge"
    batch_size = BATCH_SIZE  # `dit.scoring.features` reads images in these batches: the same passes as here

    def __init__(self, judge: ToyJudge):
        self.judge = judge
        self.identity = f"toy_judge:{judge.settings.cache_name()}"

    @torch.no_grad()
    def extract(self, images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
        """{"pool": float64 (N, D) features, "logits": float32 (N, 10)}: one forward pass per batch
        (the head on the features: what `ToyJudge.features` and `.logits` give, bit for bit),
        each batch converted to [-1, 1] on its own, so the input tensor is one batch at a time."""
        images = check_images(images)
        _as_model_input(images[:0], self.judge.image_size)  # the size check, before any pass
        if not len(images):  # (a rank with no samples) empty outputs of the right widths
            return {"pool": self.judge.features(images), "logits": self.judge.logits(images).numpy()}
        net, pools, logits = self.judge.net, [], []
        for i in range(0, len(images), self.batch_size):
            features = net.features(_as_model_input(images[i : i + self.batch_size], self.judge.image_size))
            pools.append(features.double())
            logits.append(net.head(features))
        return {"pool": torch.cat(pools).numpy(), "logits": torch.cat(logits).numpy()}

    def classify(self, images: np.ndarray) -> np.ndarray:
        return self.judge.classify(check_images(images))
