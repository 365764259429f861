"""The convergence race (issue 14): DiT against its successors on the same backbone, the same
training budget and the same sampler budget, on two built-in data sets.

    OMP_NUM_THREADS=1 python benchmarks/bench_convergence_race.py            # the race (~40 min on 2 busy cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_convergence_race.py --quick    # plumbing only (seconds)

Recipes (each trained by the real trainer, `dit.train.run_training`, from experiment=quickstart:
the same 4-block, width-128 model on 16x16 pixels, batch 32, lr 2e-3, EMA 0.995, seed 0):

- `dit`: the DiT recipe: diffusion, learned sigma, hybrid loss; sampled with DDIM, 20 steps (20 NFE).
- `sit`: SiT: objective=flow (linear path, velocity, uniform t); the Heun ODE, 10 steps (20 NFE).
- `sit_lightning`: SiT plus the LightningDiT options that exist here: RMSNorm, SwiGLU, 2-D RoPE,
  qk-norm, logit-normal timesteps, the velocity-direction (cosine) loss; Heun, 10 steps.
- `sit_repa`: SiT plus REPA: block 2's tokens aligned to a frozen encoder's patch features. No
  pretrained encoder can be downloaded here, so the encoder is a tiny timm ViT (patch 2, 8x8 tokens)
  trained by this script as a classifier on images of a data seed that neither the DiT nor the
  judge ever sees, saved with timm's `save_for_hf` into the output directory and given to the
  trainer as `repa.encoder=<dir>`.

Data sets: `colours` (the quickstart's toy set, data=toy: each class has its own colour) and
`shapes` (the shape-only variant, dit.data.toy variant="shapes": colours random, areas equal), written
as an ImageFolder and trained through data=imagefolder (the trainer's toy reader has no variant key).

Each run writes a checkpoint every `--eval-every` steps; the EMA weights of those at `--eval-steps`
draw `--num-samples` class-balanced samples without guidance (cfg 1: one network pass per
evaluation), from the same noise for every recipe, scored by that data set's judge (dit.scoring.judge, trained on real images of
its own seed): class accuracy and the judge Fréchet distance to real images of another seed.
An interrupted race resumes: a run directory with its `race_run.json` is not trained again.
Results: benchmarks/results/convergence_race.json and a plot, docs/assets/convergence_race.png
(drawn with PIL by dit.reporting.charts, as `python -m dit.report` draws: matplotlib is not among
the project's dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402

from common import machine_info  # noqa: E402
from dit.config import flatten_model_overrides, register_configs, to_train_config  # noqa: E402
from dit.io.atomic import write_json_atomic  # noqa: E402
from dit.flow.config import flow_from_config, is_flow  # noqa: E402
from dit.scoring.frechet import feature_statistics, frechet_distance  # noqa: E402
from dit.scoring.judge import ToyJudge  # noqa: E402
from dit.sampling.images import SampleOrder, generate_samples
from dit.sampling.samplers import build_sampler
from dit.sampling.loading import load_for_sampling
from dit.sampling.settings import SamplerSettings
from dit.sampling.trained import diffusion_from_config
from dit.sampling.order import initial_noise, sample_generators  # noqa: E402
from dit.data.toy import NUM_CLASSES, make_toy_arrays, to_model_range, write_toy_imagefolder  # noqa: E402
from dit.train import run_training  # noqa: E402
from dit.train.report import flow_grid_images  # noqa: E402
from dit.reporting.charts import PALETTE, Panel, Series, figure  # noqa: E402

DATASETS = ("colours", "shapes")
IMAGE_SIZE = 16
NFE = 20  # network evaluations per sample, for every recipe
DDIM_STEPS = NFE  # DDIM: one evaluation per step
HEUN_STEPS = NFE // 2  # Heun: two evaluations per step (the corrector on every step)
SAMPLE_SEED = 0
REAL_SEED = 1  # the reference images (training uses data seed 0, the judge its own seeds)
ENCODER_SEED = 2_000_003  # the REPA encoder's training images: a seed no other part uses
REPA_DEPTH = 2  # of 4 blocks: the paper's k = 8 of 28 is the first third

LIGHTNING = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.rope=true", "model.qk_norm=true",
             "objective.time_sampling=logit_normal", "objective.cosine_weight=1.0"]
RECIPES = {
    "dit": [],
    "sit": ["objective=flow"],
    "sit_lightning": ["objective=flow", *LIGHTNING],
    "sit_repa": ["objective=flow", f"repa.depth={REPA_DEPTH}", "repa.coeff=0.5", f"repa.resolution={IMAGE_SIZE}",
                 "repa.projector_dim=256"],  # + repa.encoder=<dir>, added once the encoder is trained
}
SAMPLER = {"dit": f"DDIM {DDIM_STEPS} steps", "flow": f"Heun ODE {HEUN_STEPS} steps"}


def train_config(overrides: list[str]):
    """The TrainConfig that `python train.py <overrides>` runs with."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_train_config(hydra_compose("train", overrides=flatten_model_overrides(list(overrides))))


# ------------------------------------------------------------------------------ the REPA encoder


def train_encoder(out_dir: Path, variant: str, steps: int) -> tuple[Path, dict]:
    """A tiny ViT (timm) trained as a classifier on toy images of ENCODER_SEED, saved with
    timm's save_for_hf: REPA's frozen encoder, independent of the judge and of the DiT's data."""
    import timm  # optional heavy dependency, needed by this recipe only

    args = dict(img_size=IMAGE_SIZE, patch_size=2, embed_dim=64, depth=4, num_heads=4, num_classes=NUM_CLASSES,
                global_pool="avg", class_token=False)
    images, labels = make_toy_arrays(300, IMAGE_SIZE, ENCODER_SEED, variant)
    held, held_labels = make_toy_arrays(30, IMAGE_SIZE, ENCODER_SEED + 1, variant)
    x_all, y_all = to_model_range(images), torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ENCODER_SEED)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(y_all), (64,))
            x = x_all[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(net(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(to_model_range(held)).argmax(1).numpy() == held_labels).mean())
    path = out_dir / f"encoder_{variant}"
    # The REPA encoder normalises with its pretrained config's mean/std: ours sees [-1, 1] inputs
    # mapped by (x + 1) / 2 then (x - 0.5) / 0.5, i.e. unchanged.
    net.pretrained_cfg = {**net.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    timm.models.save_for_hf(net, str(path), model_args=args, safe_serialization=True)
    return path, {"steps": steps, "heldout_accuracy": accuracy, "final_loss": float(loss.detach())}


# ------------------------------------------------------------------------------ scoring


def sample_checkpoint(path: Path, num_samples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """`num_samples` class-balanced samples of a checkpoint's EMA weights, no guidance, NFE
    network evaluations each: DDIM for diffusion checkpoints, the Heun ODE for flow ones. Sample
    i's noise comes from (SAMPLE_SEED, i), the same for every recipe."""
    model, autoencoder, _ = load_for_sampling(path, which="ema")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    objective = (blob.get("config") or {}).get("objective")
    labels = np.arange(num_samples) % NUM_CLASSES
    if not is_flow(objective):
        settings = SamplerSettings(sampler="ddim", num_steps=DDIM_STEPS, cfg_scale=1.0, guided_channels="all")
        sampler = build_sampler(settings, diffusion_from_config(None, model.config.learn_sigma), autoencoder)
        images, labels = generate_samples(model, sampler, autoencoder, np.arange(num_samples),
                                          SampleOrder(seed=SAMPLE_SEED, batch_size=batch_size, labels=labels))
        return images, labels, SAMPLER["dit"]
    flow = flow_from_config(objective)
    settings = SamplerSettings(sampler="heun", num_steps=HEUN_STEPS, cfg_scale=1.0, guided_channels="all")
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    out = []
    for start in range(0, num_samples, batch_size):
        idx = np.arange(start, min(start + batch_size, num_samples))
        noise = initial_noise(sample_generators(SAMPLE_SEED, idx), shape)
        out.append(flow_grid_images(model, flow, autoencoder, torch.from_numpy(labels[idx]), settings, noise=noise))
    return np.concatenate(out), labels, SAMPLER["flow"]


def score(images: np.ndarray, labels: np.ndarray, judge: ToyJudge, real_stats) -> dict:
    mu, sigma = feature_statistics(judge.features(images))
    return {"class_accuracy": float((judge.classify(images) == labels).mean()),
            "judge_fd": float(frechet_distance(mu, sigma, *real_stats))}


def anchors(judge: ToyJudge, real_stats, variant: str, num_samples: int) -> dict:
    """Two fixed points of the FD scale, from the same judge and reference: other real images
    (the floor at this sample count) and uniform noise images. An untrained flow model's ODE
    does not move its input (adaLN-Zero: velocity 0), so its samples are clamped Gaussian noise:
    `gaussian_noise` is that model's distance."""
    other, other_labels = make_toy_arrays(num_samples // NUM_CLASSES, IMAGE_SIZE, REAL_SEED + 1, variant)
    gens = sample_generators(SAMPLE_SEED, np.arange(len(other)))
    noise = initial_noise(gens, (3, IMAGE_SIZE, IMAGE_SIZE))  # (N, 3, H, W): what a flow sampler starts from
    noise = torch.clamp(127.5 * noise + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {"real_images": score(other, other_labels, judge, real_stats),
            "gaussian_noise": score(noise, other_labels, judge, real_stats)}


# ------------------------------------------------------------------------------ the race


def run_race(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipes = args.recipes or list(RECIPES)
    results = {"machine": machine_info("cpu"), "protocol": {
        "steps": args.steps, "eval_steps": args.eval_steps, "num_samples": args.num_samples, "nfe": NFE,
        "cfg_scale": 1.0, "samplers": SAMPLER, "image_size": IMAGE_SIZE, "num_real": args.num_real,
        "recipes": {k: RECIPES[k] for k in recipes}, "base": "experiment=quickstart"}, "datasets": {}}
    for variant in args.datasets:
        t0 = time.time()
        judge = ToyJudge.load_or_train(out / "judges", image_size=IMAGE_SIZE, seed=0, progress=False, variant=variant,
                                       **args.judge_overrides)
        real, _ = make_toy_arrays(args.num_real // NUM_CLASSES, IMAGE_SIZE, REAL_SEED, variant)
        real_stats = feature_statistics(judge.features(real))
        entry = {"judge": {"heldout_accuracy": judge.stats.get("heldout_accuracy")}, "runs": {},
                 "anchors": anchors(judge, real_stats, variant, args.num_samples)}
        if variant == "colours":
            data = ["data=toy"]
        else:
            root = write_toy_imagefolder(out / "data_shapes", 500, IMAGE_SIZE, seed=0, variant="shapes")
            data = ["data=imagefolder", f"data.root={root}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0"]
        for recipe in recipes:
            overrides = ["experiment=quickstart", *data, *RECIPES[recipe], f"name=race_{variant}_{recipe}",
                         f"max_steps={args.steps}", f"ckpt.every={args.eval_every}", "ckpt.keep_last=null",
                         "ckpt.every_minutes=null", "log.samples.every=0", f"log.every={args.eval_every}"]
            run_info = {}
            if recipe == "sit_repa":
                encoder, run_info["encoder"] = train_encoder(out, variant, args.encoder_steps)
                overrides.append(f"repa.encoder={encoder}")
            cfg = train_config(overrides)
            run_dir = out / "runs" / f"{variant}_{recipe}"
            info_path = run_dir / "race_run.json"
            if info_path.is_file():  # trained by an earlier, interrupted invocation: reuse its checkpoints
                run_info.update(json.loads(info_path.read_text()))
            else:
                start = time.time()
                run_training(cfg, run_dir)
                run_info["train_seconds"] = time.time() - start
                run_info["steps_per_second"] = args.steps / run_info["train_seconds"]
                write_json_atomic(info_path, run_info)
            curve = []
            for step in args.eval_steps:
                images, labels, sampler = sample_checkpoint(run_dir / "checkpoints" / f"{step:07d}.pt",
                                                            args.num_samples, args.batch_size)
                curve.append({"step": step, **score(images, labels, judge, real_stats)})
                print(f"{variant:8s} {recipe:14s} step {step:5d}  acc {curve[-1]['class_accuracy']:.3f}  "
                      f"FD {curve[-1]['judge_fd']:.1f}", flush=True)
            run_info.update(sampler=sampler, curve=curve, overrides=overrides)
            entry["runs"][recipe] = run_info
        entry["seconds"] = time.time() - t0
        results["datasets"][variant] = entry
    results["goal"] = goal_summary(results)
    return results


def goal_summary(results: dict) -> dict:
    """The issue's goal per data set: the first scored step at which each recipe's judge FD is at
    or below the DiT baseline's final FD, as a fraction of the baseline's steps (and the class
    accuracy there: an FD reached while the samples are still near noise is no win)."""
    summary = {}
    for variant, entry in results["datasets"].items():
        runs = entry["runs"]
        if "dit" not in runs:
            continue
        final = runs["dit"]["curve"][-1]
        target, steps = final["judge_fd"], final["step"]
        reach = {}
        for recipe, run in runs.items():
            hit = next((p for p in run["curve"] if p["judge_fd"] <= target), None)
            reach[recipe] = {"first_step": None if hit is None else hit["step"],
                             "fraction_of_baseline": None if hit is None else hit["step"] / steps,
                             # an FD reached by near-noise samples is no win: read it beside the accuracy
                             "class_accuracy_then": None if hit is None else hit["class_accuracy"]}
        best = min((r for r in reach if r != "dit" and reach[r]["first_step"] is not None),
                   key=lambda r: reach[r]["first_step"], default=None)
        summary[variant] = {"baseline_final_fd": target, "baseline_steps": steps, "reach": reach, "best": best,
                            "goal_met": best is not None and reach[best]["fraction_of_baseline"] <= 0.25}
    return summary


COLOURS = {"dit": PALETTE[0], "sit": PALETTE[1], "sit_lightning": PALETTE[2], "sit_repa": PALETTE[3]}


def _panel(title: str, curves: dict, log_y: bool, y_label: str, hline=None, vline=None) -> Panel:
    """One chart (dit.reporting.charts): `curves` {recipe: [(step, value)]}, each recipe in its colour,
    a dot per scored step, the recipes named at the top right."""
    series = [Series(name, curve, COLOURS.get(name, (0, 0, 0))) for name, curve in curves.items()]
    return Panel(title, series, log_y=log_y, y_label=y_label, hline=hline, vline=vline)


def plot(results: dict, path: Path) -> Path:
    """Judge FD (log scale, top) and class accuracy (bottom) vs training steps: one line per
    recipe, one column per data set; grey lines: DiT's final FD and a quarter of its steps.
    Drawn by dit.reporting.charts (PIL: matplotlib is not a dependency of the project)."""
    fd_row, acc_row = [], []
    for variant, entry in results["datasets"].items():
        runs = entry["runs"]
        goal = results["goal"].get(variant) or {}
        fd = {r: [(p["step"], p["judge_fd"]) for p in run["curve"]] for r, run in runs.items()}
        acc = {r: [(p["step"], 100 * p["class_accuracy"]) for p in run["curve"]] for r, run in runs.items()}
        quarter = goal.get("baseline_steps", 0) / 4 or None
        fd_row.append(_panel(f"{variant} toy set: judge Frechet distance (log)", fd, True, "FD, lower is better",
                             goal.get("baseline_final_fd"), quarter))
        acc_row.append(_panel(f"{variant} toy set: class accuracy", acc, False, "% (chance 10)", None, quarter))
    image = figure(f"Convergence race: {results['protocol']['nfe']} NFE per sample, no guidance "
                   f"(DiT: {SAMPLER['dit']}; flow: {SAMPLER['flow']})", [fd_row, acc_row], panel_size=(520, 300))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def markdown_table(results: dict) -> str:
    """The README's table: accuracy / judge FD per recipe (rows) and scored step (columns), per data set."""
    lines = []
    for variant, entry in results["datasets"].items():
        runs = entry["runs"]
        steps = [p["step"] for p in next(iter(runs.values()))["curve"]]
        lines += [f"**{variant}** (judge: {100 * entry['judge']['heldout_accuracy']:.0f} % on held-out real images)", "",
                  "| recipe | sampler (20 NFE) | " + " | ".join(f"step {s}" for s in steps) + " | steps/s |",
                  "| --- | --- | " + " | ".join("---:" for _ in steps) + " | ---: |"]
        for recipe, run in runs.items():
            cells = [f"{100 * p['class_accuracy']:.1f} % / {p['judge_fd']:.0f}" for p in run["curve"]]
            lines.append(f"| {recipe} | {run['sampler']} | " + " | ".join(cells) + f" | {run['steps_per_second']:.2f} |")
        a = entry.get("anchors")
        if a:
            rest = " |" * len(steps)  # the other step columns and steps/s stay empty
            lines.append(f"| *other real images* | | {100 * a['real_images']['class_accuracy']:.1f} % / "
                         f"{a['real_images']['judge_fd']:.1f} |{rest}")
            lines.append(f"| *Gaussian noise (an untrained flow model)* | | "
                         f"{100 * a['gaussian_noise']['class_accuracy']:.1f} % / {a['gaussian_noise']['judge_fd']:.0f} |{rest}")
        lines.append("")
    return "\n".join(lines)


def repo_relative(value):
    """`value` with this checkout's absolute path removed from every string (the recorded
    overrides name the encoder and data folders under it): results files carry no machine paths."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v) for v in value]
    return value.replace(str(REPO) + os.sep, "") if isinstance(value, str) else value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a plumbing check: a few steps, few samples")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[50, 100, 200, 400],
                        help="the checkpoints scored (sampling 250 images costs about as much as 50 training steps)")
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--num-real", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--encoder-steps", type=int, default=600)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--recipes", nargs="+", default=None, choices=list(RECIPES))
    parser.add_argument("--out", default=str(REPO / "outputs" / "convergence_race"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "convergence_race.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "assets" / "convergence_race.png"))
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the results files of runs on separate data sets (e.g. two processes, one "
                             "per data set) into --json and --plot, training nothing")
    args = parser.parse_args(argv)
    args.judge_overrides = {}
    if args.quick:
        args.steps, args.eval_every, args.num_samples, args.num_real, args.encoder_steps = 4, 2, 20, 100, 5
        args.batch_size, args.eval_steps = 20, [2, 4]
        args.judge_overrides = {"steps": 20, "num_per_class": 20}  # a judge that runs, not one that judges
    if args.steps % args.eval_every or any(s % args.eval_every or not 0 < s <= args.steps for s in args.eval_steps):
        parser.error(f"--steps {args.steps} and every --eval-steps {args.eval_steps} must be multiples of "
                     f"--eval-every {args.eval_every} (checkpoints are written there), at most --steps")
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        results = {**parts[0], "datasets": {k: v for part in parts for k, v in part["datasets"].items()},
                   "machines": [part["machine"] for part in parts]}
        for variant, entry in results["datasets"].items():  # files written before anchors existed
            if "anchors" not in entry:
                judge = ToyJudge.load_or_train(Path(args.out) / "judges", image_size=IMAGE_SIZE, seed=0,
                                               progress=False, variant=variant)
                real, _ = make_toy_arrays(args.num_real // NUM_CLASSES, IMAGE_SIZE, REAL_SEED, variant)
                entry["anchors"] = anchors(judge, feature_statistics(judge.features(real)), variant,
                                           results["protocol"]["num_samples"])
        results["goal"] = goal_summary(results)
    else:
        results = run_race(args)
    write_json_atomic(Path(args.json), repo_relative(results))
    if args.plot:
        plot(results, Path(args.plot))
    print(markdown_table(results))
    for variant, goal in results["goal"].items():
        print(f"{variant}: DiT's final FD {goal['baseline_final_fd']:.1f} at {goal['baseline_steps']} steps; "
              f"best {goal['best']}: {goal['reach'].get(goal['best'])}; goal met: {goal['goal_met']}")
    return results


if __name__ == "__main__":
    main()
