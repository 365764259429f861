"""Sampling and evaluation throughput: images/s of each sampler (network passes counted) and of
Inception feature extraction, for a small model, measured in the same run.

    python benchmarks/bench_sampling_eval.py --threads 1             # CPU
    python benchmarks/bench_sampling_eval.py --device cuda --model DiT-XL/2 --input-size 32 --batch-size 64

Sampling: a DiT of the given architecture with random (perturbed) weights, `--batch-size`
images per call, classifier-free guidance at `--cfg-scale` (cond + null rows in one batched pass),
through `dit.sampling.sample_latents` for DDPM-250 (the paper's protocol, the baseline), DDIM-50,
DPM-Solver++-20, and DPM-Solver++-20 with a guidance interval (the null pass skipped outside
it). Latents only (the VAE decode is the same for every sampler). NFE = network passes per
sample; "rows" counts the batch rows the network processed per sample (2 per guided pass).
The samplers alternate repetition by repetition, so all see the same load on a shared machine.

Features: torch-fidelity's InceptionV3 (random weights written to a temp file by the tests'
helper: the cost does not depend on the weights) on `--feature-images` uint8 images, the resize
to 299 included.

Prints a table (median images/s over `--repeats`, min-max) and the speedup of each sampler
over DDPM-250 last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.sampling.images import sample_latents
from dit.sampling.order import initial_noise, sample_generators
from dit.sampling.settings import SamplerSettings
from dit.scoring.inception import InceptionFeatures  # noqa: E402
from dit.diffusion import create_diffusion  # noqa: E402
from dit.models import DiT_models  # noqa: E402

SAMPLERS = [  # (label, sampler, steps, guidance interval)
    ("ddpm-250", "ddpm", 250, None),
    ("ddim-50", "ddim", 50, None),
    ("dpm++-20", "dpm++", 20, None),
    ("dpm++-20 gi[0,700]", "dpm++", 20, (0, 700)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--input-size", type=int, default=8, help="latent side (8: 64x64 images with a KL-f8 VAE)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--feature-images", type=int, default=8)
    p.add_argument("--feature-batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids spin-waiting on a machine shared with other jobs)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels, num_classes=1000)
    with torch.no_grad():  # zero-initialised output layers would make every step trivial
        for prm in model.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    model = model.to(device).eval()
    diffusion = create_diffusion("")
    labels = torch.arange(args.batch_size, device=device) % 1000
    gens = sample_generators(0, range(args.batch_size))
    noise = initial_noise(gens, (args.in_channels, args.input_size, args.input_size)).to(device)

    def run(sampler, steps, interval):
        counter: list = []
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        settings = SamplerSettings(sampler=sampler, num_steps=steps, cfg_scale=args.cfg_scale,
                                     guidance_interval=interval)
        sample_latents(model, diffusion, labels, settings, noise=noise,
                         generator=sample_generators(0, range(len(labels))), denoiser_out=counter)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, counter[0]

    # Warm-up: one short run per sampler (allocations, diffusers import).
    for _, sampler, _, interval in SAMPLERS:
        run(sampler, 2, interval)
    times = {label: [] for label, *_ in SAMPLERS}
    nfe = {}
    for _ in range(args.repeats):
        for label, sampler, steps, interval in SAMPLERS:
            seconds, den = run(sampler, steps, interval)
            times[label].append(args.batch_size / seconds)
            nfe[label] = (den.calls, den.rows / args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import write_random_inception_weights  # the tests' offline weights: same cost as real ones

        weights = write_random_inception_weights(Path(tmp) / "random-inception.pth")
        extractor = InceptionFeatures(weights, device=device, batch_size=args.feature_batch_size,
                                        allow_download=False)
        side = args.input_size * 8
        images = np.random.default_rng(0).integers(0, 256, (args.feature_images, side, side, 3), dtype=np.uint8)
        extractor.extract(images[: args.feature_batch_size])  # warm-up
        feat = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            extractor.extract(images)
            feat.append(args.feature_images / (time.perf_counter() - start))

    base = statistics.median(times["ddpm-250"])
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"# {args.model} on {args.in_channels}x{args.input_size}x{args.input_size} latents, batch "
          f"{args.batch_size}, cfg {args.cfg_scale}, {args.repeats} repeats")
    print(f"{'sampler':<22}{'NFE':>5}{'rows/img':>10}{'img/s (median)':>16}{'min-max':>18}{'vs ddpm-250':>13}")
    results = {"samplers": {}, "features": {}}
    for label, *_ in SAMPLERS:
        med = statistics.median(times[label])
        print(f"{label:<22}{nfe[label][0]:>5}{nfe[label][1]:>10.0f}{med:>16.3f}"
              f"{min(times[label]):>9.3f}-{max(times[label]):<8.3f}{med / base:>12.1f}x")
        results["samplers"][label] = {"nfe": nfe[label][0], "rows_per_image": nfe[label][1],
                                      "images_per_s": times[label], "speedup_vs_ddpm250": med / base}
    fmed = statistics.median(feat)
    print(f"inception features ({args.feature_images} images {side}x{side}, batch {args.feature_batch_size}): "
          f"{fmed:.2f} img/s (min-max {min(feat):.2f}-{max(feat):.2f})")
    results["features"] = {"images_per_s": feat}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
