"""The quickstart, shortened: `experiment=quickstart` trained for a fraction of its steps on
smaller images, sampled with guidance and scored by the toy judge, must show that the model
learned the *class-conditional* distribution by margins a broken pipeline cannot reach:

- class accuracy far above chance (10 %): a pipeline that ignores the labels stays near chance;
- a judge Frechet distance several times lower than the untrained model's: a wrong loss target
  (or no learning at all) leaves the samples as far from the data as the untrained model's.

It goes through the real code: hydra composes conf/experiment/quickstart.yaml, `run_training`
trains and checkpoints, `dit.sampling` loads the checkpoint and samples, the toy judge (`dit.scoring.judge`) scores.

The one command (`python -m dit.quickstart`, dit/cli/quickstart.py) is run end to end, shortened: both
rows printed and written, and a relaunch reuses the finished steps.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit.scoring.judge import ToyJudge
from dit.cli.quickstart import EVAL as QUICKSTART_EVAL, compose_config, eval_keys as quickstart_eval_keys
from dit.cli.quickstart import main as quickstart_main
from dit.config import to_eval_config
from dit.sampling.images import SampleOrder, generate_samples
from dit.sampling.samplers import build_sampler
from dit.sampling.trained import diffusion_from_config
from dit.sampling.loading import load_for_sampling
from dit.sampling.settings import SamplerSettings
from dit.data.toy import NUM_CLASSES, make_toy_arrays
from dit.train import run_training

from conftest import train_config


# The shortened run: 8x8 images (a 4x4 token grid), the quickstart's recipe otherwise.
SHORT = ["data.image_size=8", "max_steps=1000", "log.every=100"]
CFG_SCALE = 2.0  # the quickstart's guidance scale
NUM_SAMPLES = 200
# Margins. Chance is 0.1; the full quickstart reaches > 0.9 and a > 10x lower distance.
MIN_CLASS_ACCURACY = 0.6
MIN_FRECHET_RATIO = 5.0


def quickstart_config(overrides: list[str]):
    return train_config(["experiment=quickstart", *overrides])


def score_checkpoint(path: Path, judge: ToyJudge, real: np.ndarray, judge_report) -> dict:
    """Guided DDIM samples of every class from the checkpoint's EMA weights, judged."""
    model, autoencoder, _ = load_for_sampling(path)
    labels = np.arange(NUM_SAMPLES) % NUM_CLASSES
    settings = SamplerSettings(sampler="ddim", num_steps=20, cfg_scale=CFG_SCALE, guided_channels="all")
    sampler = build_sampler(settings, diffusion_from_config(None, model.config.learn_sigma), autoencoder)
    images, labels = generate_samples(model, sampler, autoencoder, range(NUM_SAMPLES),
                                      SampleOrder(seed=0, batch_size=NUM_SAMPLES, labels=labels))
    return judge_report(images, labels, real, judge=judge)


def run_short_quickstart(tmp_path: Path, judge_report) -> tuple[dict, dict]:
    """(trained report, untrained report) of the shortened quickstart."""
    trained = run_training(quickstart_config(SHORT), tmp_path / "trained")
    # The untrained baseline: the same run for one step at learning rate 0 (adaLN-Zero: the
    # network's output is exactly zero at initialisation).
    untrained = run_training(quickstart_config([*SHORT, "max_steps=1", "optim.lr=0"]), tmp_path / "untrained")
    size = quickstart_config(SHORT).data.image_size
    judge = ToyJudge.load_or_train(tmp_path / "judge", image_size=size, seed=0, progress=False)
    real, _ = make_toy_arrays(NUM_SAMPLES // NUM_CLASSES, size, seed=1)
    return (score_checkpoint(Path(trained["checkpoint"]), judge, real, judge_report),
            score_checkpoint(Path(untrained["checkpoint"]), judge, real, judge_report))


@pytest.mark.slow
def test_short_quickstart_learns_the_class_conditional_distribution(tmp_path, judge_report):
    trained, untrained = run_short_quickstart(tmp_path, judge_report)
    print(f"trained {trained}\nuntrained {untrained}")
    assert untrained["class_accuracy"] < 0.3  # the baseline really is untrained
    assert trained["class_accuracy"] >= MIN_CLASS_ACCURACY, trained
    assert trained["frechet_distance"] * MIN_FRECHET_RATIO <= untrained["frechet_distance"], (trained, untrained)


ONE_COMMAND = ["max_steps=20", "data.image_size=8"]  # the command's overrides pass through to both runs


@pytest.mark.slow
def test_the_one_command_quickstart_trains_scores_prints_both_rows_and_reuses_finished_steps(tmp_path, monkeypatch,
                                                                                              capsys):
    """`python -m dit.quickstart` end to end, shortened (20 steps on 8x8 images, 50 samples per model): both
    runs train, both are scored, the table is printed and written; a relaunch trains nothing."""
    monkeypatch.chdir(tmp_path)  # outputs/results/eval_results.csv, as eval_fid.py writes it, lands here
    out = tmp_path / "outputs"
    summary = quickstart_main([*ONE_COMMAND, "--out", str(out), "--num-samples", "50"])
    printed = capsys.readouterr().out
    rows = {row["model"]: row for row in summary["rows"]}
    assert set(rows) == {"trained, 20 steps", "untrained"}
    for label in rows:
        assert f"| {label} |" in printed
    assert Path(rows["trained, 20 steps"]["checkpoint"]) == out / "quickstart" / "checkpoints" / "0000020.pt"
    assert Path(rows["untrained"]["checkpoint"]) == out / "quickstart_untrained" / "checkpoints" / "0000001.pt"
    assert rows["untrained"]["class_accuracy"] < 0.3  # the baseline is the untrained model
    assert json.loads((out / "quickstart" / "summary.json").read_text())["rows"] == summary["rows"]
    for run in ("quickstart", "quickstart_untrained"):  # what eval_fid.py writes per model
        record = json.loads((out / run / "samples.toy_judge.metrics.json").read_text())
        assert record["metrics"]["num_samples"] == 50
        assert record["metrics"]["fid"] == rows["untrained" if "untrained" in run else "trained, 20 steps"]["judge_fd"]
    assert len((tmp_path / "outputs" / "results" / "eval_results.csv").read_text().splitlines()) == 3  # header + 2 rows
    assert len(list((out / "toy_real8").glob("*/*.png"))) == 1000

    trained_mtime = Path(rows["trained, 20 steps"]["checkpoint"]).stat().st_mtime_ns
    again = quickstart_main([*ONE_COMMAND, "--out", str(out), "--num-samples", "50"])
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 3, printed  # trained, untrained, real images
    assert Path(rows["trained, 20 steps"]["checkpoint"]).stat().st_mtime_ns == trained_mtime
    assert again["rows"] == summary["rows"]  # seeded: the same scores again


class FakeClock:
    """time.perf_counter for the quickstart: advanced by the fake stages below, by their nominal seconds."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_a_relaunch_that_reuses_the_training_keeps_its_time_in_the_summary_and_draws_the_runs(tmp_path, monkeypatch,
                                                                                                capsys):
    """Issue 23, item 6: a relaunch that found the work done wrote its own few seconds as the
    summary's wall_s. The time of a reused stage now comes from the earlier summary; and (item 8)
    both runs' curves and scores are drawn by dit.reporting. Training and scoring are stand-ins
    that take nominal seconds on a fake clock."""
    import dit.cli.quickstart as quickstart

    clock = FakeClock()
    monkeypatch.setattr(quickstart, "time", clock)

    def train(cfg, run_dir):
        clock.now += 600.0 if cfg.max_steps > 1 else 5.0
        checkpoint = quickstart.checkpoint_at(Path(run_dir), cfg.max_steps)
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")
        lines = [{"step": s, "train/loss": 1.0 / s} for s in range(1, cfg.max_steps + 1)]
        (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return {"loss": lines[-1]["train/loss"], "checkpoint": str(checkpoint)}

    def score(cfg):
        clock.now += 50.0
        untrained = "untrained" in cfg.checkpoint
        return {"metrics": {"fid": 5000.0 if untrained else 100.0, "class_accuracy": 0.1 if untrained else 0.9}}

    monkeypatch.setattr(quickstart, "run_training", train)
    monkeypatch.setattr(quickstart, "generate_and_evaluate", score)
    out = tmp_path / "outputs"
    args = ["max_steps=20", "data.image_size=8", "--out", str(out), "--num-samples", "50"]
    first = quickstart_main(args)
    assert first["wall_s"] == 600 + 5 + 50 + 50
    capsys.readouterr()
    again = quickstart_main(args)
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 3, printed
    assert again["wall_s"] == first["wall_s"]  # the reused training's 605 s are still counted
    assert again["launch_wall_s"] == 100 and first["launch_wall_s"] == first["wall_s"]  # this launch only scored
    assert json.loads((out / "quickstart" / "summary.json").read_text())["wall_s"] == first["wall_s"]
    assert "wall time 705 s in all: this launch 100 s, plus trained model 600 s" in printed, printed
    # The picture and table of both runs, through dit.reporting.
    png, md = out / "quickstart" / "report.png", out / "quickstart" / "report.md"
    assert str(png) in printed and Image.open(png).size[0] > 0
    table = md.read_text()
    assert "| trained, 20 steps | 20 | 0.05 | 100 (step 20) |" in table
    assert "| untrained | 1 | 1 | 5000 (step 1) |" in table


@pytest.mark.slow
def test_the_flow_variant_trains_in_its_own_folder_and_is_scored_at_twenty_heun_evaluations(tmp_path, monkeypatch,
                                                                                            capsys):
    """`python -m dit.quickstart objective=flow` (issue 24's one-word variant), shortened: the same
    model and budget trained with flow matching into outputs/quickstart_flow (never the DiT run's
    folder), sampled with the Heun ODE at 10 steps = 20 network evaluations per sample, guidance 2.0,
    and the table says so."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs"
    summary = quickstart_main(["objective=flow", "max_steps=3", "data.image_size=8", "--out", str(out),
                               "--num-samples", "20"])
    printed = capsys.readouterr().out
    rows = {row["model"]: row for row in summary["rows"]}
    assert Path(rows["trained, 3 steps"]["checkpoint"]) == out / "quickstart_flow" / "checkpoints" / "0000003.pt"
    assert Path(rows["untrained"]["checkpoint"]) == out / "quickstart_flow_untrained" / "checkpoints" / "0000001.pt"
    assert not (out / "quickstart").exists()
    assert "| model (guidance 2.0, 10 Heun steps = 20 NFE, 20 samples) |" in printed
    for run in ("quickstart_flow", "quickstart_flow_untrained"):
        state = torch.load(out / run / "checkpoints" / ("0000003.pt" if run == "quickstart_flow" else "0000001.pt"),
                           weights_only=True)
        assert state["config"]["objective"]["kind"] == "flow"
        sampling = json.loads((out / run / "samples.toy_judge.metrics.json").read_text())["sampling"]
        assert (sampling["sampler"], sampling["num_steps"], sampling["cfg_scale"]) == ("heun", 10, 2.0), sampling
    assert summary["eval_keys"] == quickstart_eval_keys("flow")


def test_each_objective_is_scored_by_a_sampler_it_fits_and_dits_keys_are_unchanged():
    """The quickstart's scoring keys compose into eval_fid.py settings whose sampler fits the
    objective (SamplerSettings.for_objective raises otherwise); DiT's are the documented ones."""
    assert quickstart_eval_keys("diffusion") == QUICKSTART_EVAL
    expected = {"diffusion": ("ddim", 20, 2.0, 20), "flow": ("heun", 10, 2.0, 20), "meanflow": ("meanflow", 1, 1.0, 1)}
    for kind, (sampler, steps, scale, nfe) in expected.items():
        cfg = to_eval_config(compose_config("eval", ["checkpoint=x.pt", "reference=r", *quickstart_eval_keys(kind)]))
        settings = cfg.sampler_settings(cfg.bulk.cfg_scale).for_objective(kind).check()
        spent = settings.nfe or settings.num_steps  # a diffusion sampler: one evaluation per step
        assert (settings.sampler, settings.num_steps, settings.cfg_scale, spent) == (sampler, steps, scale, nfe)
