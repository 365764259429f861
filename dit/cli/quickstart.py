"""`python -m dit.quickstart`: the README's quickstart as one command, resumable.

    python -m dit.quickstart                          # ~10 min on 2 CPU cores: train, sample, score, print
    python -m dit.quickstart max_steps=200            # any train.py override, passed to both runs
    python -m dit.quickstart --out /tmp/qs --num-samples 100
    python -m dit.quickstart objective=flow           # the SiT variant: same model and budget (VARIANT_SAMPLERS)

It runs the steps of docs/quickstart.md with the same settings, in this process:

1. train `experiment=quickstart` (train.py's config and `dit.train.run_training`);
2. the untrained baseline: the same run for one step at learning rate 0 (adaLN-Zero: the
   network's output is exactly zero at initialisation), without a sample grid;
3. the real toy images to compare with (`python -m dit.toy`'s images: 100 per class, data seed 1,
   which training never reads);
4. for each checkpoint, what `eval_fid.py` does with the quickstart's keys: 500 class-balanced
   samples, DDIM 20 steps, guidance 2.0 on all channels, scored by the toy judge
   (`dit.cli.eval_fid.generate_and_evaluate`, which writes `<run>/samples.toy_judge.metrics.json` and a
   row of outputs/results/eval_results.csv);
5. the table (class accuracy and judge Frechet distance, trained vs untrained), printed and written
   to `<out>/<name>/summary.json`, and the picture of both runs (`dit.reporting`, what
   `python -m dit.report` draws): the training loss and the two scores against the step, in
   `<out>/<name>/report.png`, with the table of `python -m dit.report` in `report.md`.

A second launch reuses what a first one finished: a checkpoint at the final step, the untrained
checkpoint, the real images (all of them present). An interrupted training resumes from its
newest checkpoint, as a relaunched train.py does. The scoring is always redone (about 40 s per
model, deterministic: the same numbers again). The summary's `wall_s` is the time the results
took: this launch's, plus the recorded time of each stage a relaunch reused (`stage_seconds`,
`reused`; `launch_wall_s` is this launch alone), so a relaunch that only rescores does not replace
the quickstart's time by its own.

The configs are composed by hydra's compose API from the same conf/ as train.py and eval_fid.py,
so a bad override fails as it would there, in one line (dit/cli/errors.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dit.cli import config_dir
from dit.cli.errors import run_program
from dit.cli.eval_fid import generate_and_evaluate
from dit.config import ConfigError, flatten_model_overrides, register_configs, to_train_config
from dit.io.atomic import write_text_atomic
from dit.cli.runtime import tune_host_allocator
from dit.data.toy import NUM_CLASSES, imagefolder_class_dirs, write_toy_imagefolder
from dit.reporting import load_run, write_report
from dit.train import run_training
from dit.train.faults import NonFiniteTrainingError
from dit.train.lock import RunDirectoryBusy

log = logging.getLogger(__name__)

# The baseline's overrides, after the user's: one step at learning rate 0 leaves the initial
# weights (adaLN-Zero: zero output), and no grid is drawn for it.
UNTRAINED = ["max_steps=1", "optim.lr=0", "log.samples.every=0"]
# The real images: python -m dit.toy's defaults (100 per class, seed 1: a seed training never reads).
REAL_PER_CLASS = 100
REAL_SEED = 1
# eval_fid.py's keys in the quickstart's evaluation (docs/quickstart.md), except the paths.
EVAL = ["feature_extractor=toy_judge", "metrics=[fid]", "sampler=ddim", "sampler.num_steps=20",
        "guided_channels=all", "bulk.cfg_scale=2.0", "bulk.labels=balanced", "bulk.batch_size=100"]
# The one-word variants (`python -m dit.quickstart objective=flow`): the same model, data and
# budget trained with another objective, scored at the same 20 network evaluations per sample
# where its sampler allows (Heun: two a step), and in its own run folder (quickstart_<kind>) so
# that it never resumes the DiT run. MeanFlow: its one-step sampler without sampling-time
# guidance (the guidance is trained in: docs/meanflow.md).
VARIANT_SAMPLERS = {
    "flow": ["sampler=heun", "sampler.num_steps=10", "bulk.cfg_scale=2.0"],
    "meanflow": ["sampler=meanflow", "sampler.num_steps=1", "bulk.cfg_scale=1.0"],
}
SCORING = {"diffusion": "guidance 2.0, 20 DDIM steps", "flow": "guidance 2.0, 10 Heun steps = 20 NFE",
           "meanflow": "trained-in guidance, 1 MeanFlow step = 1 NFE"}
NUM_SAMPLES = 500
STAGES = 5
# The stages a relaunch can reuse (their time is recorded in summary.json's stage_seconds).
WORK_STAGES = ("trained model", "untrained baseline", "real images")


def eval_keys(kind: str) -> list[str]:
    """eval_fid.py's keys for a quickstart model trained with objective `kind`."""
    if kind not in VARIANT_SAMPLERS:
        return list(EVAL)
    own = {key.split("=")[0] for key in VARIANT_SAMPLERS[kind]}
    return [key for key in EVAL if key.split("=")[0] not in own] + VARIANT_SAMPLERS[kind]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """What hydra composes for `python <config_name>.py <overrides>` (train.py, eval_fid.py)."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name, overrides=flatten_model_overrides(list(overrides)))


def checkpoint_at(run_dir: Path, step: int) -> Path:
    """The checkpoint file of `step` in a run directory (dit/train/resume.py's naming)."""
    return run_dir / "checkpoints" / f"{step:07d}.pt"


def _progress(stage: int, text: str) -> None:
    print(f"[quickstart {stage}/{STAGES}] {text}", flush=True)


def train_stage(stage: int, label: str, overrides: list[str], out: Path) -> tuple[Path, float | None]:
    """Train as `python train.py <overrides>` would into out/<name>, unless its final checkpoint
    exists; returns that checkpoint and the seconds trained (None: reused)."""
    cfg = to_train_config(compose_config("train", overrides))
    run_dir = out / cfg.name
    final = checkpoint_at(run_dir, cfg.max_steps)
    if final.is_file():
        _progress(stage, f"{label}: reusing {final}")
        return final, None
    _progress(stage, f"{label}: training {cfg.max_steps} step{'s' * (cfg.max_steps != 1)} into {run_dir} ...")
    start = time.perf_counter()
    result = run_training(cfg, run_dir)
    seconds = time.perf_counter() - start
    _progress(stage, f"{label}: done in {seconds:.0f} s, loss {result['loss']:.4g}: {result['checkpoint']}")
    return Path(result["checkpoint"]), seconds


def real_images_stage(stage: int, out: Path, image_size: int) -> tuple[Path, float | None]:
    """The real toy images at `image_size` (python -m dit.toy DIR --image-size N), unless all
    exist; returns their folder and the seconds spent (None: reused)."""
    root = out / f"toy_real{image_size}"
    dirs = imagefolder_class_dirs()
    expected = [root / dirs[i % NUM_CLASSES] / f"{i // NUM_CLASSES:06d}.png" for i in range(REAL_PER_CLASS * NUM_CLASSES)]
    if all(p.is_file() for p in expected):
        _progress(stage, f"real images: reusing {len(expected)} in {root}")
        return root, None
    start = time.perf_counter()
    write_toy_imagefolder(root, REAL_PER_CLASS, image_size, REAL_SEED)  # PNGs written atomically
    seconds = time.perf_counter() - start
    _progress(stage, f"real images: wrote {len(expected)} {image_size}x{image_size} images to {root} "
                     f"in {seconds:.0f} s")
    return root, seconds


def score_stage(stage: int, label: str, checkpoint: Path, reference: Path, num_samples: int,
                keys: list[str] = EVAL) -> dict:
    """eval_fid.py with the quickstart's keys (`eval_keys`) on `checkpoint`: samples next to the
    run directory."""
    samples = checkpoint.parent.parent / "samples.npz"
    _progress(stage, f"{label}: sampling {num_samples} and scoring with the toy judge ...")
    start = time.perf_counter()
    cfg = compose_config("eval", [f"checkpoint={checkpoint}", f"reference={reference}", *keys,
                                  f"bulk.num_samples={num_samples}", f"bulk.out={samples}"])
    record = generate_and_evaluate(cfg)
    metrics = record["metrics"]
    _progress(stage, f"{label}: class accuracy {100 * metrics['class_accuracy']:.1f} %, judge FD "
                     f"{metrics['fid']:.1f} ({time.perf_counter() - start:.0f} s)")
    return record


def format_table(rows: list[dict], num_samples: int, kind: str = "diffusion") -> str:
    """The README's table: one row per model."""
    lines = [f"| model ({SCORING[kind]}, {num_samples} samples) | class accuracy (chance 10 %) "
             "| judge Fréchet distance |", "| --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['model']} | {100 * row['class_accuracy']:.1f} % | {row['judge_fd']:.1f} |")
    return "\n".join(lines)


def previous_summary(path: Path) -> dict:
    """An earlier launch's summary.json ({} if there is none, or it is unreadable)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def wall_time(launch_s: float, stage_seconds: dict, reused: list[str], previous: dict) -> tuple[float, str]:
    """The time the results took and the sentence that says how it was counted: this launch plus
    what the earlier launch (its summary.json, `previous`) spent on the stages this one reused,
    which are added to `stage_seconds`. An earlier summary without per-stage times (written before
    they were recorded) keeps its `wall_s` when this launch only rescored."""
    if not reused:
        return launch_s, f"wall time {launch_s:.0f} s"
    recorded = previous.get("stage_seconds")
    recorded = recorded if isinstance(recorded, dict) else {}
    kept = {stage: recorded[stage] for stage in reused if isinstance(recorded.get(stage), (int, float))}
    old_wall = previous.get("wall_s")
    if not recorded and isinstance(old_wall, (int, float)) and len(reused) == len(WORK_STAGES):
        return max(old_wall, launch_s), (f"wall time {max(old_wall, launch_s):.0f} s, kept from the earlier launch "
                                         f"whose results this one reused (this launch {launch_s:.0f} s)")
    stage_seconds.update(kept)
    total = launch_s + sum(kept.values())
    if kept:
        text = (f"wall time {total:.0f} s in all: this launch {launch_s:.0f} s, plus "
                + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in kept.items()) + " from an earlier launch")
    else:
        text = f"wall time {launch_s:.0f} s this launch"
    unknown = [stage for stage in reused if stage not in kept]
    if unknown:
        text += f" ({', '.join(unknown)} reused; no earlier summary.json recorded its time: not counted)"
    return total, text


def quickstart_report(rows: list[dict], records: dict, run_dirs: dict, out_dir: Path, steps: dict,
                      kind: str = "diffusion") -> tuple[Path, Path]:
    """The picture and table of both runs (dit.reporting, as `python -m dit.report` writes them):
    the training loss from their metrics.jsonl, and the judge's scores of each final checkpoint
    as evaluation points at its step."""
    runs = []
    for row, key in zip(rows, ("trained", "untrained")):
        run, metrics = load_run(run_dirs[key], row["model"]), records[key]["metrics"]
        run.scores = {"judge_fd": [(steps[key], metrics["fid"])],
                      "class_accuracy": [(steps[key], metrics["class_accuracy"])]}
        run.last_step = max(run.last_step, steps[key])
        runs.append(run)
    return write_report(runs, out_dir, title="Quickstart: the trained model against the untrained baseline "
                                             f"(scores: {SCORING[kind]}, the toy judge)")


def run_quickstart(overrides: list[str], out: str | Path = "outputs", num_samples: int = NUM_SAMPLES) -> dict:
    """The five stages (module docstring); returns the summary written to out/<name>/summary.json."""
    if num_samples < NUM_CLASSES or num_samples % NUM_CLASSES:
        raise ConfigError(f"--num-samples {num_samples}: give a positive multiple of {NUM_CLASSES} "
                          "(the samples are class-balanced)")
    out = Path(out)
    start = time.perf_counter()
    base = ["experiment=quickstart", *overrides]
    trained_cfg = to_train_config(compose_config("train", base))
    kind = trained_cfg.objective.kind
    if kind != "diffusion" and trained_cfg.name == "quickstart":  # a variant: its own run folder
        base.append(f"name=quickstart_{kind}")
        trained_cfg = to_train_config(compose_config("train", base))
    keys = eval_keys(kind)
    name = trained_cfg.name
    path = out / name / "summary.json"
    previous = previous_summary(path)
    seconds: dict[str, float | None] = {}
    trained, seconds["trained model"] = train_stage(1, "trained model", base, out)
    untrained, seconds["untrained baseline"] = train_stage(2, "untrained baseline",
                                                           [*base, f"name={name}_untrained", *UNTRAINED], out)
    reference, seconds["real images"] = real_images_stage(3, out, trained_cfg.data.image_size)
    records = {}
    for stage, (label, ckpt) in ((4, ("trained", trained)), (5, ("untrained", untrained))):
        scored = time.perf_counter()
        records[label] = score_stage(stage, label, ckpt, reference, num_samples, keys)
        seconds[f"scoring {label}"] = time.perf_counter() - scored
    rows = [{"model": f"trained, {trained_cfg.max_steps} steps", "checkpoint": str(trained),
             "class_accuracy": records["trained"]["metrics"]["class_accuracy"],
             "judge_fd": records["trained"]["metrics"]["fid"]},
            {"model": "untrained", "checkpoint": str(untrained),
             "class_accuracy": records["untrained"]["metrics"]["class_accuracy"],
             "judge_fd": records["untrained"]["metrics"]["fid"]}]
    png, md = quickstart_report(rows, records, {"trained": out / name, "untrained": out / f"{name}_untrained"},
                                out / name, {"trained": trained_cfg.max_steps, "untrained": 1}, kind)
    reused = [stage for stage, s in seconds.items() if s is None]
    stage_seconds = {stage: round(s, 1) for stage, s in seconds.items() if s is not None}
    launch_s = time.perf_counter() - start
    wall_s, wall_text = wall_time(launch_s, stage_seconds, reused, previous)
    summary = {"overrides": list(overrides), "num_samples": num_samples, "reference": str(reference),
               "eval_keys": keys, "rows": rows, "wall_s": round(wall_s, 1), "launch_wall_s": round(launch_s, 1),
               "stage_seconds": stage_seconds, "reused": reused,
               "sample_grid": str(out / name / "samples" / f"{trained_cfg.max_steps:07d}.png"),
               "report": {"png": str(png), "md": str(md)}}
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    print(format_table(rows, num_samples, kind))
    print(f"curves and scores of both runs: {png} (table: {md})")
    print(f"{wall_text}; wrote {path}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m dit.quickstart", description="Train, sample and score the quickstart model against "
        "the untrained baseline (docs/quickstart.md); a relaunch reuses finished steps.")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both runs, e.g. max_steps=200; objective=flow or "
                        "objective=meanflow trains a variant into outputs/quickstart_<kind>")
    parser.add_argument("--out", default="outputs", help="output root: run directories and real images (default outputs)")
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES,
                        help=f"samples scored per model, a multiple of {NUM_CLASSES} (default {NUM_SAMPLES})")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:  # training's progress lines (train.py gets them from hydra)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(asctime)s][%(name)s] %(message)s")
    return run_quickstart(args.overrides, out=args.out, num_samples=args.num_samples)


def _program() -> None:
    tune_host_allocator()  # as train.py and eval_fid.py (dit/cli/runtime.py)
    main()


def run() -> None:
    """The program: what `python -m dit.quickstart` does (known failures in one line, as train.py's)."""
    run_program(_program, RunDirectoryBusy, NonFiniteTrainingError)


if __name__ == "__main__":
    run()
