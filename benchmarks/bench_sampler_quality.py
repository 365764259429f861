"""Sampling at matched quality: judge Fréchet distance and class accuracy of few-step samplers
(DDIM, DPM-Solver++, guidance intervals) against DDPM-250 on the quickstart model, with the
network evaluations each one spends, measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampler_quality.py --threads 1 \\
        --json benchmarks/results/sampler_quality.json | tee benchmarks/results/sampler_quality.txt
    python benchmarks/bench_sampler_quality.py --num-samples 200 --configs ddim-20 dpm++-10   # quick look

Needs the quickstart checkpoint and the real reference images (docs/quickstart.md), which
`python -m dit.quickstart` writes (or, step by step, `python train.py experiment=quickstart` and
`python -m dit.toy outputs/toy_real16 --image-size 16`).

Every configuration samples the same `--num-samples` images: sample i has the initial noise (and,
for DDPM, the per-step noise) of `dit.sampling.sample_generators(seed, [i])` and the balanced
label i mod 10, in network batches of `--batch-size`, at the quickstart evaluation settings
(EMA weights, guidance `--cfg-scale` 2.0, guided channels all, x0 clipped to [-1, 1] at every step
as the library does in pixel space: `--clip-denoised auto|on|off`), on the chain the checkpoint
was trained on. Samples go through
`dit.sampling.sample_latents`, whose `denoiser_out` hook gives the exact number of network
passes (NFE, per sample: a guided pass over the cond + null rows counts once) and of rows the
network processed (2 per guided pass, 1 per unguided one). They are scored as
`eval_fid.py feature_extractor=toy_judge` scores them (`dit.scoring.metrics` with the toy judge of
`dit.scoring.extractors.build_feature_extractor` against `--reference`): the judge Fréchet distance (FD) and the class accuracy.

Configurations (`--configs`, default below) are written SAMPLER-STEPS[@LO-HI][/oORDER]:
`ddpm-250`, `ddim-20`, `dpm++-10`, `dpm++-10@0-700` (guidance only at timesteps 0..700, the
conditional pass alone elsewhere), `dpm++-10/o3` (DPM-Solver++ of order 3, built here on
diffusers' scheduler; the library's `dpm++` is order 2). The first configuration is the baseline
and must be ddpm-250.

Noise: `--noise-seeds` repeats the baseline with other seeds (fresh noise and per-step noise;
default seed 1, `--noise-seeds` with no value: none); their spread is the seed-to-seed noise of
FD at this N. Each row also gives a bootstrap standard deviation of FD (generated features
resampled, reference fixed).

Prints a table (config, NFE, rows/img, FD, FD / FD(ddpm-250), accuracy, sampling seconds) and
then the chosen configuration: the fewest NFE (<= `--max-nfe`) whose FD is at most
(1 + `--tolerance`) x the baseline's and whose accuracy is not more than `--max-accuracy-drop`
below the baseline's, with its NFE ratio against 250 last. Seconds are wall-clock sampling time
(VAE-free: pixel space) with `--threads` torch threads on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.scoring import metrics as M  # noqa: E402
from dit.io.images import to_uint8
from dit.sampling.guidance import GuidedDenoiser
from dit.sampling.images import sample_latents
from dit.sampling.loading import load_for_sampling
from dit.sampling.order import initial_noise, sample_blocks, sample_generators, sample_labels
from dit.sampling.settings import SamplerSettings
from dit.sampling.trained import diffusion_from_config
from dit.scoring.extractors import build_feature_extractor  # noqa: E402

DEFAULT_CONFIGS = [
    "ddpm-250",
    "ddim-10", "ddim-20", "ddim-25", "ddim-50",
    "dpm++-5", "dpm++-8", "dpm++-10", "dpm++-15", "dpm++-20", "dpm++-25",
    "dpm++-10/o3", "dpm++-10@0-700", "dpm++-20@0-700",
]
CLIP_CHOICES = {"auto": None, "on": True, "off": False}  # auto: on for the pixel autoencoder (the quickstart's)
_SPEC = re.compile(r"^(ddpm|ddim|dpm\+\+)-(\d+)(?:@(\d+)-(\d+))?(?:/o([123]))?$")


def parse_config(spec: str) -> dict:
    m = _SPEC.match(spec)
    if not m:
        raise argparse.ArgumentTypeError(f"bad config {spec!r}: use SAMPLER-STEPS[@LO-HI][/oORDER], "
                                         "e.g. ddim-20, dpm++-10@0-700, dpm++-10/o3")
    sampler, steps, lo, hi, order = m.groups()
    if order is not None and sampler != "dpm++":
        raise argparse.ArgumentTypeError(f"{spec}: an order (/oN) only applies to dpm++")
    return {"label": spec, "sampler": sampler, "num_steps": int(steps),
            "guidance_interval": None if lo is None else (int(lo), int(hi)),
            "order": None if order is None else int(order)}


def dpm_solver_order(denoiser: GuidedDenoiser, diffusion, noise: torch.Tensor, num_steps: int,
                     order: int, clip_denoised: bool) -> torch.Tensor:
    """Multistep DPM-Solver++ of the given order on the training beta schedule (diffusers'
    scheduler), fed the epsilon channels of the guided output: `dit.sampling`'s dpm++ with the
    order as a parameter."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas, algorithm_type="dpmsolver++",
        solver_order=order, prediction_type="epsilon", lower_order_final=True,
        thresholding=clip_denoised, sample_max_value=1.0)  # x0 clamped to [-1, 1], as dit.sampling.trained
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    for t in scheduler.timesteps:
        eps = denoiser(x, torch.full((len(x),), int(t), device=x.device, dtype=torch.long))[:, :channels]
        x = scheduler.step(eps, t, x).prev_sample
    return x


def generate(model, autoencoder, diffusion, config: dict, args, seed: int):
    """uint8 images (N, H, W, 3), labels (N,), NFE per sample, rows per sample, seconds."""
    cfg = model.config
    labels_all = sample_labels(seed, range(args.num_samples), cfg.num_classes, "balanced")
    images, calls, rows = [], set(), 0
    start = time.perf_counter()
    for idx in sample_blocks(range(args.num_samples), args.batch_size):
        y = labels_all[torch.as_tensor(idx)]
        gens = sample_generators(seed, idx)  # fresh per config: same x_T and per-step noise for all
        noise = initial_noise(gens, (cfg.in_channels, cfg.input_size, cfg.input_size))
        counter: list = []
        settings = SamplerSettings(sampler=config["sampler"], num_steps=config["num_steps"],
                                     cfg_scale=args.cfg_scale, guided_channels=args.guided_channels,
                                     guidance_interval=config["guidance_interval"],
                                     clip_denoised=CLIP_CHOICES[args.clip_denoised]).resolved(autoencoder)
        if config["order"] in (None, 2) or config["sampler"] != "dpm++":
            latents = sample_latents(model, diffusion, y, settings, noise=noise, generator=gens, denoiser_out=counter)
            den = counter[0]
        else:
            den = GuidedDenoiser(model, y, settings)
            model.eval()
            with torch.no_grad():
                latents = dpm_solver_order(den, diffusion, noise, config["num_steps"], config["order"],
                                           settings.clip_denoised)
        with torch.no_grad():
            images.append(to_uint8(autoencoder.decode(latents)))
        calls.add(den.calls)
        rows += den.rows
    seconds = time.perf_counter() - start
    if len(calls) != 1:
        raise RuntimeError(f"{config['label']}: batches made different numbers of network passes {sorted(calls)}")
    return np.concatenate(images), labels_all.numpy(), calls.pop(), rows / args.num_samples, seconds


def _fd(pool, reference) -> float:
    mu, sigma = M.feature_statistics(pool)
    return M.frechet_distance(mu, sigma, reference.mu, reference.sigma)


def score(images, labels, reference, extractor, bootstrap: int, seed: int, base_pool=None):
    """({"fd", "accuracy", bootstrap sds, "fd_to_baseline"}, pooled judge features (N, D))."""
    feats = M.sample_features(images, extractor, labels)
    out = M.metrics_from_features(feats, reference, extractor.identity,
                                  M.MetricOptions(fid=True, sfid=False, isc=False, prc=False))
    pool = feats["pool"]
    result = {"fd": out["fid"], "accuracy": out["class_accuracy"]}
    if base_pool is not None:  # distance to the baseline's own samples (same noise, same labels)
        mu_b, sigma_b = M.feature_statistics(base_pool)
        mu, sigma = M.feature_statistics(pool)
        result["fd_to_baseline"] = M.frechet_distance(mu, sigma, mu_b, sigma_b)
    if bootstrap:
        rng = np.random.default_rng(seed)
        fds, ratios = [], []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(pool), len(pool))
            fds.append(_fd(pool[idx], reference))
            if base_pool is not None:  # paired: the same sample indices for config and baseline
                ratios.append(fds[-1] / _fd(base_pool[idx], reference))
        result["fd_bootstrap_std"] = float(np.std(fds, ddof=1))
        if ratios:
            result["fd_ratio_paired_bootstrap_std"] = float(np.std(ratios, ddof=1))
    return result, pool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="outputs/quickstart/checkpoints/0002000.pt")
    p.add_argument("--which", default="ema", help="ema (the evaluation weights) or model")
    p.add_argument("--reference", default="outputs/toy_real16", help="real images (folder or .npz)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1],
                   help="extra seeds for the baseline: the seed-to-seed noise of FD")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--guided-channels", default="all")
    p.add_argument("--clip-denoised", choices=sorted(CLIP_CHOICES), default="auto",
                   help="clamp each step's x0 to [-1, 1]: auto (the library default) is on in pixel space")
    p.add_argument("--configs", type=parse_config, nargs="+", default=[parse_config(c) for c in DEFAULT_CONFIGS])
    p.add_argument("--tolerance", type=float, default=0.05, help="FD may exceed the baseline's by this fraction")
    p.add_argument("--max-nfe", type=int, default=25)
    p.add_argument("--max-accuracy-drop", type=float, default=0.01,
                   help="the chosen config's class accuracy may be at most this far below the baseline's")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FD std (0: off)")
    p.add_argument("--judge-cache", default="~/.cache/dit", help="toy judge and reference-statistics cache")
    p.add_argument("--judge-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_cfg = args.configs[0]
    if (base_cfg["sampler"], base_cfg["guidance_interval"]) != ("ddpm", None):
        p.error("the first config is the baseline and must be ddpm (ddpm-250 for the real run)")
    wall_start = time.perf_counter()

    model, autoencoder, provenance = load_for_sampling(args.checkpoint, which=args.which)
    model.eval()
    diffusion = diffusion_from_config(provenance, model.config.learn_sigma)  # the chain it was trained on
    cache = Path(args.judge_cache).expanduser() if args.judge_cache else None
    image_size = model.config.input_size * autoencoder.downsample_factor
    extractor = build_feature_extractor("toy_judge", image_size=image_size,
                                          judge_cache_dir=str(cache) if cache else None, judge_seed=args.judge_seed)
    reference = M.load_reference(args.reference, extractor, cache_dir=cache / "ref_stats" if cache else None,
                                 need_features=False)

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"# {args.checkpoint} ({args.which}, step {provenance.get('step')}), {args.num_samples} samples "
          f"(balanced labels, seed {args.seed}), batch {args.batch_size}, cfg {args.cfg_scale}, guided channels "
          f"{args.guided_channels}, clip_denoised {args.clip_denoised}; judge FD vs {args.reference} ({reference.num_images} real images)", flush=True)

    rows, base_pool = [], None
    for config in args.configs:
        images, labels, nfe, rows_per_img, seconds = generate(model, autoencoder, diffusion, config, args, args.seed)
        scores, pool = score(images, labels, reference, extractor, args.bootstrap, args.seed, base_pool)
        base_pool = pool if base_pool is None else base_pool
        rows.append({**config, "nfe": nfe, "rows_per_image": rows_per_img, "seconds": seconds, **scores})
        r = rows[-1]
        print(f"  done {r['label']}: NFE {nfe}, FD {r['fd']:.1f}, acc {r['accuracy']:.3f}, {seconds:.0f} s", flush=True)
    noise_runs = []
    for seed in args.noise_seeds:
        images, labels, nfe, rows_per_img, seconds = generate(model, autoencoder, diffusion, base_cfg, args, seed)
        noise_runs.append({"seed": seed, "seconds": seconds,
                           **score(images, labels, reference, extractor, args.bootstrap, seed, base_pool)[0]})
        print(f"  done {base_cfg['label']} seed {seed}: FD {noise_runs[-1]['fd']:.1f}, {seconds:.0f} s", flush=True)

    base = rows[0]
    for r in rows:
        r["fd_ratio"] = r["fd"] / base["fd"]
        r["nfe_ratio_vs_baseline"] = r["nfe"] / base["nfe"]
    seed_fds = [base["fd"]] + [n["fd"] for n in noise_runs]
    noise = {"seeds": [args.seed] + list(args.noise_seeds), "fd": seed_fds,
             "spread_rel": (max(seed_fds) - min(seed_fds)) / float(np.mean(seed_fds)) if len(seed_fds) > 1 else None,
             "std_rel": float(np.std(seed_fds, ddof=1) / np.mean(seed_fds)) if len(seed_fds) > 1 else None,
             "bootstrap_std_rel": base.get("fd_bootstrap_std", float("nan")) / base["fd"]}

    nan = float("nan")
    print(f"{'config':<20}{'NFE':>5}{'rows/img':>10}{'judge FD':>10}{'boot sd':>9}{'FD/base':>9}{'paired sd':>10}"
          f"{'FD to base':>11}{'accuracy':>10}{'seconds':>9}")
    for r in rows:
        print(f"{r['label']:<20}{r['nfe']:>5}{r['rows_per_image']:>10.0f}{r['fd']:>10.1f}"
              f"{r.get('fd_bootstrap_std', nan):>9.1f}{r['fd_ratio']:>9.3f}"
              f"{r.get('fd_ratio_paired_bootstrap_std', nan):>10.3f}{r.get('fd_to_baseline', 0.0):>11.1f}"
              f"{r['accuracy']:>10.3f}{r['seconds']:>9.0f}")
    for n in noise_runs:
        print(f"{base['label'] + ' seed ' + str(n['seed']):<20}{base['nfe']:>5}{base['rows_per_image']:>10.0f}"
              f"{n['fd']:>10.1f}{n.get('fd_bootstrap_std', nan):>9.1f}{n['fd'] / base['fd']:>9.3f}{'':>10}"
              f"{n.get('fd_to_baseline', nan):>11.1f}{n['accuracy']:>10.3f}{n['seconds']:>9.0f}")
    if noise["spread_rel"] is not None:
        print(f"seed-to-seed noise of {base['label']} FD: {', '.join(f'{v:.1f}' for v in seed_fds)} "
              f"(spread {100 * noise['spread_rel']:.1f} % of the mean); bootstrap sd "
              f"{100 * noise['bootstrap_std_rel']:.1f} %")

    def qualifies(r, guard=True):
        return (r is not base and r["nfe"] <= args.max_nfe and r["fd"] <= (1 + args.tolerance) * base["fd"]
                and (not guard or r["accuracy"] >= base["accuracy"] - args.max_accuracy_drop))

    def pick(guard):
        ok = [r for r in rows if qualifies(r, guard)]
        return min(ok, key=lambda r: (r["nfe"], r["rows_per_image"], r["fd"])) if ok else None

    chosen, unguarded = pick(True), pick(False)
    matched = [r for r in rows if r is not base and r["nfe"] <= args.max_nfe
               and abs(r["fd_ratio"] - 1) <= args.tolerance]
    two_sided = min(matched, key=lambda r: (r["nfe"], r["rows_per_image"], r["fd"])) if matched else None
    print(f"two-sided match (|FD/base - 1| <= {args.tolerance:g}, NFE <= {args.max_nfe}): "
          + (f"{two_sided['label']} (FD {two_sided['fd_ratio']:.3f}x, accuracy {two_sided['accuracy']:.3f}, "
             f"FD to base {two_sided['fd_to_baseline']:.1f}, NFE ratio {two_sided['nfe'] / base['nfe']:.3f})"
             if two_sided else "none"))
    if unguarded is not None and unguarded is not chosen:
        print(f"(without the accuracy guard: {unguarded['label']}, FD {unguarded['fd_ratio']:.3f}x, accuracy "
              f"{unguarded['accuracy']:.3f} vs {base['accuracy']:.3f})")
    if chosen is None:
        close = min((r for r in rows if r is not base and r["nfe"] <= args.max_nfe), key=lambda r: r["fd"], default=None)
        print(f"no config with NFE <= {args.max_nfe} reaches FD <= {1 + args.tolerance:.2f}x {base['label']}"
              + (f"; closest: {close['label']} (FD {close['fd_ratio']:.3f}x)" if close else ""))
    else:
        print(f"chosen: {chosen['label']}: FD {chosen['fd']:.1f} = {chosen['fd_ratio']:.3f}x {base['label']}'s "
              f"{base['fd']:.1f}, accuracy {chosen['accuracy']:.3f} ({base['accuracy']:.3f}), rows/img "
              f"{chosen['rows_per_image']:.0f} ({base['rows_per_image']:.0f}), {chosen['seconds']:.0f} s "
              f"({base['seconds']:.0f} s)")
        print(f"NFE {chosen['nfe']} vs {base['nfe']}: {chosen['nfe'] / base['nfe']:.3f} of the evaluations "
              f"({base['nfe'] / chosen['nfe']:.1f}x fewer)")
    total = time.perf_counter() - wall_start
    print(f"# total {total:.0f} s")
    if args.json:
        out = {"machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}"},
               "args": {k: v for k, v in vars(args).items() if k != "configs"},
               "provenance": provenance, "judge": extractor.identity, "num_reference": reference.num_images,
               "results": rows, "noise": {**noise, "runs": noise_runs},
               "chosen": chosen["label"] if chosen else None,
               "chosen_without_accuracy_guard": unguarded["label"] if unguarded else None,
               "two_sided_match": two_sided["label"] if two_sided else None,
               "total_seconds": total}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
