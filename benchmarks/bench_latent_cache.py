"""Training throughput from images: VAE encoding on the fly (the reference's pipeline) versus our
latents cache, same model, same step, measured in the same run.

    python benchmarks/bench_latent_cache.py                       # CPU default: a few steps, ~2-3 min on 2 cores
    python benchmarks/bench_latent_cache.py --device cuda --batch-size 32 --steps 20 --num-images 256

Both paths run the same DiT training step (forward, DiT's hybrid loss, backward, AdamW, EMA
update) on batches from a DataLoader over a temporary ImageFolder of random images:
  on the fly:  ImageFolderDataset (ADM crop, flip) -> AutoencoderKL posterior sample x 0.18215 -> step
  cached:      LatentCacheDataset (mean + std * eps) x 0.18215                           -> step
The VAE is diffusers' AutoencoderKL with the Stable Diffusion VAE configuration and random
weights (the cost does not depend on the weights). The two paths alternate step by step (both see the
same load on a shared machine). The one-off cost of building the cache (each image and its
mirror) is timed and reported separately, with the number of epochs after which it has paid
for itself.

Flags: --model (DiT name), --batch-size, --steps (timed, per path), --warmup (untimed steps),
--num-images (size of the temp ImageFolder; loaders cycle over it), --image-size,
--source-size (side of the generated images before the ADM crop), --num-workers (DataLoader
workers, both paths), --device, --cache-dtype, --threads (torch CPU threads), --json (also
write the results to this file).
Prints images/s (median over timed steps, min-max) of both paths, and the ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, step_flops, summary, sync  # noqa: E402

from dit.autoencoder import SD_SCALE_FACTOR, VAEAutoencoder  # noqa: E402
from dit.data import (  # noqa: E402
    CacheFormat,
    CacheRun,
    DistributedResumableSampler,
    ImageFolderDataset,
    LatentCacheDataset,
    build_latent_cache,
)
from dit.config import OptimConfig  # noqa: E402
from dit.diffusion import create_diffusion  # noqa: E402
from dit.models import DiT_models  # noqa: E402
from dit.cli.runtime import tune_host_allocator  # noqa: E402
from dit.train import EMA, build_optimizer, train_step  # noqa: E402
from dit.train.randomness import RandomnessSpec, step_randomness  # noqa: E402
from dit.train.step import StepInputs, StepSetup, take_over_label_dropout  # noqa: E402


def sd_vae(device: str) -> VAEAutoencoder:
    """AutoencoderKL with the configuration of stabilityai/sd-vae-ft-ema, random weights."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", sample_size=256,
        scaling_factor=SD_SCALE_FACTOR,
    )
    return VAEAutoencoder(vae, "sd-vae-random", SD_SCALE_FACTOR).to(device)


def make_image_folder(root: Path, num_images: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        # Random low-frequency content saved as JPEG, like a photo dataset.
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def batches(dataset, batch_size: int, num_workers: int, seed: int, device: str):
    """Endless batches, epoch after epoch, in the order training would use."""
    sampler = DistributedResumableSampler(len(dataset), 1, 0, seed, drop_last=False)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            pin_memory=device.startswith("cuda"), drop_last=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        epoch += 1


class Trainer:
    """The project's training step (`dit.train.step.train_step`: label dropout, hybrid loss,
    fused AdamW, grad norm, EMA) on the batches given."""

    def __init__(self, model_name: str, latent_size: int, device: str, seed: int):
        torch.manual_seed(seed)
        self.model = DiT_models[model_name](input_size=latent_size, num_classes=1000).to(device)
        self.drop_prob = take_over_label_dropout(self.model)
        self.ema = EMA(self.model, 0.9999)
        self.opt = build_optimizer(self.model.parameters(), OptimConfig(), torch.device(device))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.diffusion = create_diffusion("")
        self.seed, self.steps = seed, 0
        self.setup = StepSetup(self.model, self.diffusion, self.opt, self.ema, num_classes=1000, params=self.params)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        spec = RandomnessSpec(self.seed, len(x), tuple(x.shape[1:]), self.diffusion.num_timesteps, self.drop_prob)
        r = step_randomness(spec, self.steps, 0, 1, x.device)
        self.steps += 1
        loss, _ = train_step(self.setup, StepInputs(x, y, r))
        return loss.item()


def flops_per_image(autoencoder, model_name: str, latent_size: int, image_size: int, device: str) -> tuple[float, float]:
    """(VAE encode, DiT training step) FLOPs per image, counted by torch's FlopCounterMode (the
    step as one forward + backward; attention under the math backend, which the counter knows)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as vae:
        autoencoder.encode(x)
    model = DiT_models[model_name](input_size=latent_size, num_classes=1000).to(device)
    z = torch.randn(1, autoencoder.latent_channels, latent_size, latent_size, device=device)
    return vae.get_total_flops(), step_flops(model, z, torch.zeros(1, dtype=torch.long, device=device))


def timed_step(trainer, stream, to_latents, device) -> tuple[float, float, float]:
    """Seconds for one step, data loading and encoding included (from asking for a batch to the
    end of its optimizer step), the seconds of that spent waiting for the batch, and the loss."""
    sync(device)
    start = time.perf_counter()
    x, y = next(stream)
    waited = time.perf_counter() - start
    loss = trainer.step(to_latents(x), y)
    sync(device)
    return time.perf_counter() - start, waited, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--source-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on an oversubscribed machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    tune_host_allocator()  # as train.py: both paths run in this process and share the setting
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    print("machine:", json.dumps(machine))
    print("args:", json.dumps(vars(args)))

    autoencoder = sd_vae(args.device)
    latent_size = autoencoder.latent_size(args.image_size)
    vae_flops, step_flops = flops_per_image(autoencoder, args.model, latent_size, args.image_size, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache_dir = Path(tmp) / "images", Path(tmp) / "cache"
        make_image_folder(root, args.num_images, args.source_size, args.seed)

        print("building the latents cache (each image and its mirror) ...", flush=True)
        sync(args.device)
        start = time.perf_counter()
        build_latent_cache(root, autoencoder, cache_dir, args.image_size, fmt=CacheFormat(dtype=args.cache_dtype),
                           run=CacheRun(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                                        progress=False))
        sync(args.device)
        build_s = time.perf_counter() - start

        gen = torch.Generator(args.device).manual_seed(args.seed)
        images = ImageFolderDataset(root, args.image_size, hflip=True, seed=args.seed)
        latents = LatentCacheDataset(cache_dir, hflip=True, sample_posterior=True, seed=args.seed)
        latents.check_compatible(autoencoder.latent_channels, latent_size)
        paths = {
            "on-the-fly": (Trainer(args.model, latent_size, args.device, args.seed),
                           batches(images, args.batch_size, args.num_workers, args.seed, args.device),
                           lambda x: autoencoder.encode(x, generator=gen)),
            "cached": (Trainer(args.model, latent_size, args.device, args.seed),
                       batches(latents, args.batch_size, args.num_workers, args.seed, args.device),
                       lambda x: x),
        }
        # Alternate the two paths step by step, so both see the same load on a shared machine.
        rates = {name: [] for name in paths}
        waits = {name: [] for name in paths}  # fraction of each step spent waiting for the batch
        for i in range(args.warmup + args.steps):
            for name, (trainer, stream, to_latents) in paths.items():
                elapsed, waited, loss = timed_step(trainer, stream, to_latents, args.device)
                if i >= args.warmup:
                    rates[name].append(args.batch_size / elapsed)
                    waits[name].append(waited / elapsed)
                tag = " (warm-up)" if i < args.warmup else ""
                print(f"  step {i}{tag} {name:>10}: {elapsed:.2f} s, loss {loss:.4f}", flush=True)
        del paths  # stop the loaders' workers before the temp folder goes
        fly, cached = rates["on-the-fly"], rates["cached"]

    fly_s, cached_s = summary(fly), summary(cached)
    build_per_image = build_s / args.num_images
    # Epochs after which building the cache has paid off: build = epochs * N * (1/fly - 1/cached).
    saving_per_image = 1 / fly_s["median"] - 1 / cached_s["median"]
    results = {
        "machine": machine, "args": vars(args),
        "on_the_fly_images_per_s": fly_s, "cached_images_per_s": cached_s,
        "cache_build_s_per_image": build_per_image,
        "cache_break_even_epochs": build_per_image / saving_per_image if saving_per_image > 0 else None,
        "data_wait_fraction": {k: summary(v) for k, v in waits.items()},
        "flops_per_image": {"vae_encode": vae_flops, "dit_step": step_flops},
        # What the ratio would be if both paths ran at the same FLOP/s: the VAE's share bounds it.
        "ratio_bound_at_equal_efficiency": (vae_flops + step_flops) / step_flops,
        "ratio_cached_over_on_the_fly": cached_s["median"] / fly_s["median"],
    }
    machine["load_average_at_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"load average (1 min) at start / end: {machine['load_average']:.1f} / "
          f"{machine['load_average_at_end']:.1f} on {machine['cpu_count']} cores")
    print(f"cache build (one-off, image + mirror): {build_per_image:.2f} s/image; "
          f"pays for itself after {results['cache_break_even_epochs']:.2f} epochs")
    for label, key, s in (("on the fly", "on-the-fly", fly_s), ("cached", "cached", cached_s)):
        print(f"{args.model} training, {label:>10}: {s['median']:.3f} images/s "
              f"(median of {s['n']}, min {s['min']:.3f}, max {s['max']:.3f}); "
              f"waiting for data {100 * statistics.median(waits[key]):.1f} % of the step")
    print(f"FLOPs per image: VAE encode {vae_flops / 1e9:.1f} G, {args.model} training step {step_flops / 1e9:.1f} G; "
          f"at equal FLOP/s the ratio would be {results['ratio_bound_at_equal_efficiency']:.2f}x")
    print(f"ratio cached / on-the-fly: {results['ratio_cached_over_on_the_fly']:.1f}x")


if __name__ == "__main__":
    main()
