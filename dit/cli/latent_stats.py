"""Measure an autoencoder's per-channel latent mean and std, for `vae.latents_mean` /
`vae.latents_std` (the latent transform of dit/autoencoder.py):

    python -m dit.latent_stats CACHE_DIR [--items N]

reads the posterior moments a latents cache holds (both mirrors where it has them) and prints
the two lists as JSON and as the override to paste (`vae.latents_mean=[...] vae.latents_std=[...]`;
the scale then defaults to 1, so training latents have zero mean and unit variance per channel).
The stats are of z - shift_factor (the cache's recorded shift, if any), the exact moments of the
latents training draws (dit.autoencoder.latent_stats). From Python, on images instead of a
cache: `measure_images(autoencoder, batches)`. Training from a cache uses the transform the
cache recorded: to train with the stats, rebuild the cache with them set (the encoded moments
do not change, only meta.json's record).
"""

from __future__ import annotations

import argparse
import json
from typing import Iterable, Optional

import torch

from dit.autoencoder import Autoencoder, latent_stats
from dit.data.latents import LatentCacheDataset


def measure_cache(path, items: Optional[int] = None) -> dict:
    """Stats over the first `items` items (all by default) of the cache at `path`."""
    cache = LatentCacheDataset(path, hflip=False, sample_posterior=False)
    n = len(cache) if items is None else min(int(items), len(cache))
    views = (True, False) if cache.meta["flip"] else (False,)
    moments = (cache.moments(i, flip) for i in range(n) for flip in views)
    mean, std = latent_stats(moments, shift=float(cache.autoencoder_spec.get("shift_factor") or 0.0))
    return {"latents_mean": mean, "latents_std": std, "items": n, "autoencoder": cache.autoencoder_spec}


@torch.no_grad()
def measure_images(autoencoder: Autoencoder, batches: Iterable[torch.Tensor]) -> dict:
    """Stats of `autoencoder` over image batches (N, 3, H, W) in [-1, 1]."""
    moments = (autoencoder.encode_moments(b) for b in batches)
    mean, std = latent_stats(((m.float().cpu(), s.float().cpu()) for m, s in moments),
                             shift=autoencoder.transform.shift)
    return {"latents_mean": mean, "latents_std": std}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", help="a latents cache directory (python -m dit.cache_latents ...)")
    parser.add_argument("--items", type=int, default=None, help="measure only the first N items")
    args = parser.parse_args(argv)
    stats = measure_cache(args.cache, args.items)
    fmt = lambda values: "[" + ",".join(f"{v:.6g}" for v in values) + "]"  # noqa: E731
    print(json.dumps({k: stats[k] for k in ("latents_mean", "latents_std", "items")}))
    print(f"vae.latents_mean={fmt(stats['latents_mean'])} vae.latents_std={fmt(stats['latents_std'])}")


if __name__ == "__main__":
    main()
