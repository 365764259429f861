"""The NFE race (issue 24): judge FD and class accuracy against network evaluations per sample
for DiT (DDIM, DPM-Solver++), SiT (Euler, Heun) and MeanFlow (its own sampler), each with
classifier-free guidance and with autoguidance, on the convergence race's two toy sets.

    OMP_NUM_THREADS=1 python benchmarks/bench_nfe_race.py            # the race at the quickstart budget
    OMP_NUM_THREADS=1 python benchmarks/bench_nfe_race.py --quick    # plumbing only (seconds)

Runs: one per objective per data set, each trained by the real trainer (`dit.train.run_training`)
from experiment=quickstart with its model and its budget (2000 steps: the 4-block, width-128 model
on 16x16 pixels, batch 32, lr 2e-3, EMA 0.995, seed 0); `dit` is the DiT recipe (diffusion,
learned sigma), `sit` is objective=flow, `meanflow` is objective=meanflow with its defaults
(guidance folded into training: omega 1, kappa 0.5, an effective scale of 2). Every run also keeps
its checkpoint at `--guide-step` (a quarter of its steps by default): the guide of autoguidance,
the "bad version" of Karras et al. 2024 (same model, data and objective, trained shorter).

NFE convention (the project's `nfe`, `SamplerSettings.nfe`): network evaluations per sample, one
per sampler step (Heun: two a step, so Heun at NFE n is n/2 steps and has no odd NFE), a guided
evaluation counted once although it runs the network on twice the rows (the conditional and the
null class for CFG, the model and its guide for autoguidance). The same for every method; the
results also record `forward_rows`, the network rows per sample (2 x NFE when guided), which is what
the compute is. Guidance: `cfg` is classifier-free guidance at `--cfg-scale` (2: the quickstart's)
for DiT and SiT, and for MeanFlow its trained-in guidance sampled at cfg_scale 1 (one row per
evaluation, as the paper samples it); `autoguidance` is D_guide + w (D - D_guide) at
`--autog-scale` with the run's own `--guide-step` EMA weights as the guide, for all three.

Scoring as the convergence race's (benchmarks/bench_convergence_race.py, whose judge, reference
images and anchors this imports): `--num-samples` class-balanced samples from the final EMA
weights, sample i's noise from (seed 0, i) for every method, scored by the data set's judge (class
accuracy, judge Frechet distance to `--num-real` real images of another seed).

Resumable: a run directory with its `race_run.json` is not trained again, and each scored point is
kept in the run's `nfe_scores.json` (keyed by everything that decides it), so an interrupted race
redoes only what is missing. Results: benchmarks/results/nfe_race.json, a plot (FD and accuracy vs
NFE, log x, a line per objective x sampler x guidance) docs/assets/nfe_race.png, a markdown table
and the issue's goal verdict on stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_convergence_race as race  # noqa: E402
from common import machine_info  # noqa: E402
from dit.data.toy import NUM_CLASSES, make_toy_arrays, write_toy_imagefolder  # noqa: E402
from dit.io.atomic import write_json_atomic  # noqa: E402
from dit.reporting.charts import PALETTE, Panel, Series, figure, pale  # noqa: E402
from dit.sampling import settings as settings_module  # noqa: E402
from dit.sampling.images import SampleOrder, generate_samples  # noqa: E402
from dit.sampling.loading import load_for_sampling  # noqa: E402
from dit.sampling.samplers import build_sampler  # noqa: E402
from dit.sampling.settings import SamplerSettings  # noqa: E402
from dit.sampling.trained import trained_objective  # noqa: E402
from dit.scoring.frechet import feature_statistics  # noqa: E402
from dit.scoring.judge import ToyJudge  # noqa: E402
from dit.train import run_training  # noqa: E402

NFES = (1, 2, 4, 10, 20, 50)
OBJECTIVES = {"dit": [], "sit": ["objective=flow"], "meanflow": ["objective=meanflow"]}
SAMPLERS = {"dit": ("ddim", "dpm++"), "sit": ("euler", "heun"), "meanflow": ("meanflow",)}
GUIDANCE = ("cfg", "autoguidance")
SAMPLER_NAMES = {"ddim": "DDIM", "dpm++": "DPM++", "euler": "Euler", "heun": "Heun", "meanflow": "MeanFlow"}
OBJECTIVE_NAMES = {"dit": "DiT", "sit": "SiT", "meanflow": "MeanFlow"}
EVALS_PER_STEP = {"heun": 2}  # every other sampler here: one network evaluation per step
MIN_STEPS = {"ddim": 2}  # a respaced DDIM chain needs both ends (SamplerSettings.check)


def num_steps_for(sampler: str, nfe: int) -> int | None:
    """The sampler's num_steps for `nfe` evaluations per sample; None where it cannot spend
    exactly that many (Heun at an odd NFE, DDIM at 1)."""
    per = EVALS_PER_STEP.get(sampler, 1)
    if nfe % per or nfe // per < MIN_STEPS.get(sampler, 1):
        return None
    return nfe // per


def autoguidance_available() -> bool:
    """Whether this checkout's sampler has guidance=autoguidance with a guide model
    (`SamplerSettings.guidance`, `build_sampler(..., guide=)`)."""
    return ("autoguidance" in getattr(settings_module, "GUIDANCE_METHODS", ())
            and "guide" in inspect.signature(build_sampler).parameters)


AUTOGUIDANCE_MISSING = ("--guidance autoguidance: this checkout's sampler has no guidance=autoguidance with a guide "
                        "model (dit.sampling.settings.GUIDANCE_METHODS, build_sampler(..., guide=)); run with "
                        "--guidance cfg until it lands")


def data_overrides(variant: str, out: Path) -> list[str]:
    """The training data of a toy set, as the convergence race trains on it."""
    if variant == "colours":
        return ["data=toy"]
    root = write_toy_imagefolder(out / "data_shapes", 500, race.IMAGE_SIZE, seed=0, variant="shapes")
    return ["data=imagefolder", f"data.root={root}", f"data.image_size={race.IMAGE_SIZE}", "data.num_workers=0"]


def train_or_reuse(out: Path, variant: str, objective: str, data: list[str], args) -> tuple[Path, dict]:
    """The run directory of one objective on one toy set, trained unless an earlier invocation
    finished it (its race_run.json), with a checkpoint at the guide step and at the end."""
    overrides = ["experiment=quickstart", *data, *OBJECTIVES[objective], f"name=nfe_race_{variant}_{objective}",
                 f"max_steps={args.steps}", f"ckpt.every={args.ckpt_every}", "ckpt.keep_last=null",
                 "ckpt.every_minutes=null", "log.samples.every=0", f"log.every={args.ckpt_every}"]
    run_dir = out / "runs" / f"{variant}_{objective}"
    info_path = run_dir / "race_run.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("overrides") != overrides:
            raise SystemExit(f"{run_dir} was trained with other overrides ({info.get('overrides')}): give another --out")
        return run_dir, info
    cfg = race.train_config(overrides)
    start = time.time()
    run_training(cfg, run_dir)
    seconds = time.time() - start
    info = {"overrides": overrides, "train_seconds": seconds, "steps_per_second": args.steps / seconds}
    write_json_atomic(info_path, info)
    return run_dir, info


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{step:07d}.pt"


class Scorer:
    """Samples one run's final EMA weights with each sampler, NFE and guidance and scores them,
    each point kept in the run's nfe_scores.json."""

    def __init__(self, run_dir: Path, args, judge: ToyJudge, real_stats):
        self.run_dir, self.args, self.judge, self.real_stats = run_dir, args, judge, real_stats
        self.model, self.autoencoder, provenance = load_for_sampling(_checkpoint(run_dir, args.steps), which="ema")
        self.objective = trained_objective(provenance, self.model.config.learn_sigma)
        self.guide = None
        self.cache_path = run_dir / "nfe_scores.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}

    def load_guide(self):
        if self.guide is None:
            guide, guide_autoencoder, provenance = load_for_sampling(_checkpoint(self.run_dir, self.args.guide_step),
                                                                     which="ema")
            guide_objective = trained_objective(provenance, guide.config.learn_sigma)
            try:
                from dit.sampling.guidance import guide_mismatch
            except ImportError:  # the check lands with autoguidance
                guide_mismatch = None
            why = guide_mismatch and guide_mismatch(self.model, self.objective, self.autoencoder, guide,
                                                    guide_objective, guide_autoencoder)
            if why:
                raise SystemExit(f"the guide checkpoint of {self.run_dir} does not fit its model: {why}")
            self.guide = guide
        return self.guide

    def settings(self, objective: str, sampler: str, guidance: str, steps: int) -> tuple[SamplerSettings, float]:
        if guidance == "cfg":
            scale = 1.0 if objective == "meanflow" else self.args.cfg_scale  # MeanFlow: its trained-in guidance
            return SamplerSettings(sampler=sampler, num_steps=steps, cfg_scale=scale, guided_channels="all"), scale
        scale = self.args.autog_scale
        return SamplerSettings(sampler=sampler, num_steps=steps, cfg_scale=scale, guided_channels="all",
                               guidance="autoguidance"), scale

    LEGACY_GUIDE = re.compile(r"\|autog[^|]*\|guide\d+")

    def key(self, sampler: str, guidance: str, nfe: int) -> str:
        """A point's key in nfe_scores.json: what decides its samples (the guide's step and
        scale only for autoguidance, so that CFG's points serve every guide)."""
        a = self.args
        guide = f"|autog{a.autog_scale:g}|guide{a.guide_step}" if guidance != "cfg" else ""
        return (f"{sampler}|{guidance}|nfe{nfe}|n{a.num_samples}|real{a.num_real}|cfg{a.cfg_scale:g}{guide}|"
                f"seed{race.SAMPLE_SEED}")

    def point(self, objective: str, sampler: str, guidance: str, nfe: int) -> dict | None:
        steps = num_steps_for(sampler, nfe)
        if steps is None:
            return None
        a = self.args
        key = self.key(sampler, guidance, nfe)
        if key in self.cache:
            return self.cache[key]
        if guidance == "cfg":  # scored before CFG's key left out the guide: the same samples
            old = next((v for k, v in self.cache.items() if self.LEGACY_GUIDE.sub("", k) == key), None)
            if old is not None:
                return old
        settings, scale = self.settings(objective, sampler, guidance, steps)
        guide = self.load_guide() if guidance == "autoguidance" else None
        built = build_sampler(settings, self.objective, self.autoencoder, **({"guide": guide} if guide is not None else {}))
        labels = np.arange(a.num_samples) % NUM_CLASSES
        stats = {}
        start = time.time()
        images, labels = generate_samples(self.model, built, self.autoencoder, np.arange(a.num_samples),
                                          SampleOrder(seed=race.SAMPLE_SEED, batch_size=a.batch_size, labels=labels),
                                          stats=stats)
        seconds = time.time() - start
        batches = -(-a.num_samples // a.batch_size)
        measured = stats["nfe"] / batches
        if measured != nfe:
            raise RuntimeError(f"{objective} {sampler} {steps} steps spent {measured} evaluations per sample, not {nfe}")
        guided = scale != 1.0
        result = {"objective": objective, "sampler": sampler, "guidance": guidance, "nfe": nfe, "num_steps": steps,
                  "cfg_scale": scale, "forward_rows": nfe * (2 if guided else 1), "sample_seconds": seconds,
                  **race.score(images, labels, self.judge, self.real_stats)}
        self.cache[key] = result
        write_json_atomic(self.cache_path, self.cache)
        return result


def run_nfe_race(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info("cpu"), "protocol": {
        "base": "experiment=quickstart", "steps": args.steps, "guide_step": args.guide_step, "nfes": args.nfes,
        "num_samples": args.num_samples, "num_real": args.num_real, "cfg_scale": args.cfg_scale,
        "meanflow_cfg_scale": 1.0, "autog_scale": args.autog_scale, "guidance": args.guidance,
        "samplers": {k: SAMPLERS[k] for k in args.objectives},
        "objectives": {k: OBJECTIVES[k] for k in args.objectives}, "image_size": race.IMAGE_SIZE,
        "nfe_convention": "network evaluations per sample, one per step (Heun two), a guided evaluation counted "
                          "once; forward_rows: network rows per sample (2 x nfe when guided)",
        "quickstart_steps": args.quickstart_steps, "reduced": args.reduced_note}, "datasets": {}}
    for variant in args.datasets:
        t0 = time.time()
        judge = ToyJudge.load_or_train(out / "judges", image_size=race.IMAGE_SIZE, seed=0, progress=False,
                                       variant=variant, **args.judge_overrides)
        real, _ = make_toy_arrays(args.num_real // NUM_CLASSES, race.IMAGE_SIZE, race.REAL_SEED, variant)
        real_stats = feature_statistics(judge.features(real))
        entry = {"judge": {"heldout_accuracy": judge.stats.get("heldout_accuracy")}, "runs": {},
                 "anchors": race.anchors(judge, real_stats, variant, args.num_samples)}
        data = data_overrides(variant, out)
        for objective in args.objectives:
            run_dir, info = train_or_reuse(out, variant, objective, data, args)
            scorer = Scorer(run_dir, args, judge, real_stats)
            points = []
            for guidance in args.guidance:
                for sampler in SAMPLERS[objective]:
                    for nfe in args.nfes:
                        p = scorer.point(objective, sampler, guidance, nfe)
                        if p is None:
                            continue
                        points.append(p)
                        print(f"{variant:8s} {objective:9s} {sampler:8s} {guidance:12s} NFE {nfe:3d}  "
                              f"acc {p['class_accuracy']:.3f}  FD {p['judge_fd']:.1f}", flush=True)
            entry["runs"][objective] = {**info, "points": points}
        entry["seconds"] = time.time() - t0
        results["datasets"][variant] = entry
    results["goal"] = goal_summary(results)
    return results


# ------------------------------------------------------------------------------ the verdict


def _fd(points: list[dict], sampler: str, guidance: str, nfe: int) -> float | None:
    return next((p["judge_fd"] for p in points if (p["sampler"], p["guidance"], p["nfe"]) == (sampler, guidance, nfe)),
                None)


def goal_summary(results: dict) -> dict:
    """The issue's race goal per data set, each comparison with classifier-free guidance (MeanFlow:
    its trained-in guidance): MeanFlow-1 FD <= DiT's DDIM-20 FD, MeanFlow-2 FD <= 1.5 x SiT's
    Heun-20 FD; and per objective, at how many (sampler, NFE) points autoguidance's FD is below
    CFG's. The autoguidance part is met for an objective when it is lower at more than half of
    its points. None where a point was not measured."""
    summary = {}
    for variant, entry in results["datasets"].items():
        runs = entry["runs"]
        get = lambda obj, *k: _fd(runs[obj]["points"], *k) if obj in runs else None  # noqa: E731
        mf1, mf2 = get("meanflow", "meanflow", "cfg", 1), get("meanflow", "meanflow", "cfg", 2)
        ddim20, heun20 = get("dit", "ddim", "cfg", 20), get("sit", "heun", "cfg", 20)
        one = None if mf1 is None or ddim20 is None else mf1 <= ddim20
        two = None if mf2 is None or heun20 is None else mf2 <= 1.5 * heun20
        autog = {}
        for objective, run in runs.items():
            pairs = [(p, _fd(run["points"], p["sampler"], "autoguidance", p["nfe"])) for p in run["points"]
                     if p["guidance"] == "cfg"]
            pairs = [(p, a) for p, a in pairs if a is not None]
            if pairs:
                lower = [f"{p['sampler']}-{p['nfe']}" for p, a in pairs if a < p["judge_fd"]]
                autog[objective] = {"lower_at": lower, "points": len(pairs), "met": len(lower) > len(pairs) / 2}
        summary[variant] = {"meanflow_1": mf1, "dit_ddim_20": ddim20, "meanflow_2": mf2, "sit_heun_20": heun20,
                            "meanflow_1_vs_ddim_20": one, "meanflow_2_vs_heun_20": two, "autoguidance": autog}
    verdicts = [v for s in summary.values() for v in (s["meanflow_1_vs_ddim_20"], s["meanflow_2_vs_heun_20"])]
    autog_any = any(o["met"] for s in summary.values() for o in s["autoguidance"].values())
    protocol = results.get("protocol") or {}
    issue_budget = (set(results["datasets"]) >= {"colours", "shapes"}
                    and protocol.get("steps") == protocol.get("quickstart_steps") and not protocol.get("reduced"))
    summary["all"] = {"meanflow_goals": None if None in verdicts or not verdicts else all(verdicts),
                      "autoguidance_goal": autog_any if any(s["autoguidance"] for s in summary.values()) else None,
                      "issue_budget": issue_budget}
    return summary


# ------------------------------------------------------------------------------ reporting


LINE_COLOURS = {"ddim": PALETTE[0], "dpm++": PALETTE[9], "euler": PALETTE[1], "heun": PALETTE[3],
                "meanflow": PALETTE[2]}


def line_label(objective: str, sampler: str, guidance: str) -> str:
    return f"{OBJECTIVE_NAMES[objective]} {SAMPLER_NAMES[sampler]} {'autog' if guidance == 'autoguidance' else 'CFG'}"


def _lines(entry: dict, value) -> list[Series]:
    series = []
    for objective, run in entry["runs"].items():
        for guidance in GUIDANCE:
            for sampler in SAMPLERS[objective]:
                pts = [(p["nfe"], value(p)) for p in run["points"] if (p["sampler"], p["guidance"]) == (sampler, guidance)]
                if pts:
                    cfg = guidance == "cfg"  # autoguidance: a pale tint of the sampler's colour, no dots
                    colour = LINE_COLOURS[sampler] if cfg else pale(LINE_COLOURS[sampler], 0.45)
                    series.append(Series(line_label(objective, sampler, guidance), sorted(pts), colour, markers=cfg))
    return series


def plot(results: dict, path: Path) -> Path:
    """Judge FD (log y, top) and class accuracy (bottom) against NFE (log x): a line per
    objective x sampler x guidance (autoguidance in a pale tint of its sampler's colour), one
    column per data set (the anchors, other real images and noise, are in the table)."""
    fd_row, acc_row, legend = [], [], {}
    nfes = results["protocol"]["nfes"]
    for variant, entry in results["datasets"].items():
        fd, acc = _lines(entry, lambda p: p["judge_fd"]), _lines(entry, lambda p: 100 * p["class_accuracy"])
        legend.update({s.label: s.colour for s in fd})
        fd_row.append(Panel(f"{variant} toy set: judge Frechet distance (log)", fd, log_y=True, y_label="FD, lower is better",
                            legend=False, x_label="NFE (log scale)", log_x=True, x_ticks=nfes,
                            round_ticks=True))
        acc_row.append(Panel(f"{variant} toy set: class accuracy", acc, y_label="% (chance 10)", legend=False,
                             x_label="NFE (log scale)", log_x=True, x_ticks=nfes, round_ticks=True, y_range=(0, 100)))
    p = results["protocol"]
    title = ("NFE race" + (f" [{p['reduced']}]" if p.get("reduced") else "") + f": {p['steps']} steps, "
             f"{p['num_samples']} samples; CFG {p['cfg_scale']:g} (MeanFlow: trained in), autog {p['autog_scale']:g} "
             f"(guide: step {p['guide_step']})")
    image = figure(title, [fd_row, acc_row], panel_size=(560, 320), legend=list(legend.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def markdown_table(results: dict) -> str:
    """Per data set: a row per objective x sampler x guidance, a column per NFE, cells 'accuracy / FD'."""
    nfes = results["protocol"]["nfes"]
    lines = []
    for variant, entry in results["datasets"].items():
        lines += [f"**{variant}** (judge: {100 * entry['judge']['heldout_accuracy']:.0f} % on held-out real images)", "",
                  "| objective | sampler | guidance | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "| --- | --- | --- | " + " | ".join("---:" for _ in nfes) + " |"]
        for objective, run in entry["runs"].items():
            for guidance in GUIDANCE:
                for sampler in SAMPLERS[objective]:
                    cells = {p["nfe"]: f"{100 * p['class_accuracy']:.1f} % / {p['judge_fd']:.0f}" for p in run["points"]
                             if (p["sampler"], p["guidance"]) == (sampler, guidance)}
                    if cells:
                        name = "CFG (trained in)" if guidance == "cfg" and objective == "meanflow" else \
                            ("CFG" if guidance == "cfg" else "autoguidance")
                        lines.append(f"| {OBJECTIVE_NAMES[objective]} | {SAMPLER_NAMES[sampler]} | {name} | " +
                                     " | ".join(cells.get(n, "n/a") for n in nfes) + " |")
        a = entry.get("anchors")
        if a:
            rest = " |" * (len(nfes) - 1)
            lines.append(f"| *other real images (the floor)* | | | {100 * a['real_images']['class_accuracy']:.1f} % / "
                         f"{a['real_images']['judge_fd']:.1f} |{rest}")
            lines.append(f"| *Gaussian noise* | | | {100 * a['gaussian_noise']['class_accuracy']:.1f} % / "
                         f"{a['gaussian_noise']['judge_fd']:.0f} |{rest}")
        lines.append("")
    return "\n".join(lines)


def verdict_lines(results: dict) -> list[str]:
    fmt = lambda v: "not measured" if v is None else f"{v:.1f}"  # noqa: E731
    yes = lambda v: "not measured" if v is None else ("yes" if v else "no")  # noqa: E731
    lines = []
    for variant, g in results["goal"].items():
        if variant == "all":
            continue
        lines.append(f"{variant}: MeanFlow-1 FD {fmt(g['meanflow_1'])} vs DiT DDIM-20 {fmt(g['dit_ddim_20'])}: "
                     f"{yes(g['meanflow_1_vs_ddim_20'])}; MeanFlow-2 FD {fmt(g['meanflow_2'])} vs 1.5 x SiT Heun-20 "
                     f"{fmt(None if g['sit_heun_20'] is None else 1.5 * g['sit_heun_20'])}: {yes(g['meanflow_2_vs_heun_20'])}")
        for objective, a in g["autoguidance"].items():
            lines.append(f"{variant}: {objective}: autoguidance below CFG at {len(a['lower_at'])} of {a['points']} "
                         f"points ({', '.join(a['lower_at']) or 'none'})")
    g = results["goal"]["all"]
    parts = f"MeanFlow parts {yes(g['meanflow_goals'])}, autoguidance part {yes(g['autoguidance_goal'])}"
    if g["issue_budget"]:
        lines.append(f"race goal: {parts}")
    else:  # a verdict of this run only: the issue's goal is judged on both toy sets at the quickstart budget
        reduced = results["protocol"].get("reduced")
        lines.append("race goal: not judged (not both toy sets at the quickstart budget" +
                     (f"; {reduced}" if reduced else "") + f"); this run alone: {parts}")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a plumbing check: a few steps, few samples, NFE 1 2 4")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: experiment=quickstart's)")
    parser.add_argument("--guide-step", type=int, default=None,
                        help="the autoguidance guide's checkpoint step (default: a quarter of --steps)")
    parser.add_argument("--ckpt-every", type=int, default=None,
                        help="training checkpoint interval (default: --guide-step); runs trained with it are "
                             "reused for any --guide-step that is a multiple of it")
    parser.add_argument("--nfes", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--num-real", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="CFG scale for DiT and SiT (MeanFlow: 1)")
    parser.add_argument("--autog-scale", type=float, default=2.0, help="autoguidance scale w, every objective")
    parser.add_argument("--guidance", nargs="+", default=list(GUIDANCE), choices=GUIDANCE)
    parser.add_argument("--datasets", nargs="+", default=list(race.DATASETS), choices=race.DATASETS)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--reduced-note", default="",
                        help="a label written into the results, plot title and verdict (e.g. 'reduced budget')")
    parser.add_argument("--out", default=str(REPO / "outputs" / "nfe_race"))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "nfe_race.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "assets" / "nfe_race.png"))
    args = parser.parse_args(argv)
    args.judge_overrides = {}
    args.quickstart_steps = int(race.train_config(["experiment=quickstart"]).max_steps)
    if args.steps is None:
        args.steps = args.quickstart_steps
    if args.quick:
        args.steps, args.guide_step, args.num_samples, args.num_real, args.batch_size = 4, 2, 20, 100, 20
        args.nfes = [n for n in args.nfes if n <= 4] or [1, 2]
        args.judge_overrides = {"steps": 20, "num_per_class": 20}  # a judge that runs, not one that judges
    if args.guide_step is None:
        args.guide_step = args.steps // 4
    if args.ckpt_every is None:
        args.ckpt_every = args.guide_step
    if not 0 < args.guide_step < args.steps or args.steps % args.ckpt_every or args.guide_step % args.ckpt_every:
        parser.error(f"--guide-step {args.guide_step} must be below --steps {args.steps}, and both multiples of "
                     f"--ckpt-every {args.ckpt_every} (checkpoints are written every --ckpt-every steps)")
    if any(n < 1 for n in args.nfes):
        parser.error(f"--nfes must be >= 1, got {args.nfes}")
    args.nfes = sorted(set(args.nfes))
    if "autoguidance" in args.guidance and not autoguidance_available():
        parser.error(AUTOGUIDANCE_MISSING)
    results = run_nfe_race(args)
    write_json_atomic(Path(args.json), race.repo_relative(results))
    if args.plot:
        plot(results, Path(args.plot))
    print(markdown_table(results))
    for line in verdict_lines(results):
        print(line)
    return results


if __name__ == "__main__":
    main()
