"""Latents cache precision: what storing the posterior mean in float16 (the old format) costs
against float32 (the default), in bytes per image and in rounding error relative to the
posterior std that training samples with.

    python benchmarks/bench_cache_precision.py [--images 64] [--json PATH]

Offline: a random two-level AutoencoderKL (downsampling 2) on 64x64 random images gives latents
of 4x32x32, the shape of the SD VAEs' latents of 256x256 images, so the bytes per image are those
of an ImageNet-256 cache; the error figures are this random VAE's, not the SD VAEs' (whose
magnitudes the float16 bound in docs/training.md covers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.autoencoder import build_autoencoder  # noqa: E402
from dit.data import CacheFormat, CacheRun, LatentCacheDataset, build_latent_cache  # noqa: E402


def _random_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=64).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            (tmp / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp / "images" / f"c{i % 2}" / f"{i}.png")
        ae = build_autoencoder(str(_random_vae(tmp / "vae")))
        caches, result = {}, {"images": args.images, "latent_shape": None, "scale_factor": ae.scale_factor}
        for mean_dtype in ("float32", "float16"):
            out = build_latent_cache(tmp / "images", ae, tmp / mean_dtype, 64,
                                     fmt=CacheFormat(mean_dtype=mean_dtype, shard_size=args.images),
                                     run=CacheRun(num_workers=0, device="cpu", progress=False))
            caches[mean_dtype] = LatentCacheDataset(out, hflip=True)
            result["latent_shape"] = list(caches[mean_dtype].latent_shape)
            result[f"bytes_per_image_mean_{mean_dtype}"] = sum(p.stat().st_size for p in out.glob("shard_*.pt")) / args.images
        errors, ratios, stds = [], [], []
        for i in range(args.images):
            for flip in (False, True):
                exact, std = caches["float32"].moments(i, flip)
                rounded, _ = caches["float16"].moments(i, flip)
                err = (rounded - exact).abs() * ae.scale_factor  # in the scaled latents training sees
                errors.append(err.max().item())
                ratios.append((err / (std * ae.scale_factor)).max().item())
                stds.append((std * ae.scale_factor).min().item())
        result.update(max_abs_error_scaled=max(errors), max_error_over_std=max(ratios), min_std_scaled=min(stds))
    for k, v in result.items():
        print(f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
