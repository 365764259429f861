"""Evaluation during training (`eval.every`): the toy judge's scores of the EMA weights land in
metrics.jsonl on 1 and 2 ranks, equal (to float rounding) to `eval_fid.py` on the checkpoint
of the same step with the same keys; keep_best keeps the best; bad eval keys fail at start-up."""

import json
from pathlib import Path

import pytest
import torch
from dit.config import ConfigError
from dit.cli.eval_fid import generate_and_evaluate
from dit.io.npz import write_samples_npz
from dit.data.toy import make_toy_arrays
from dit.train import run_training

from conftest import TINY_MODEL, compose_config, run_script, single_thread, train_config

# A 2-block DiT on 16 px toy images in pixel space, global batch 8; evaluation every 2 steps on 20
# samples (2 network batches of 10), 5 DDIM steps, scored by the toy judge.
TRAIN = [*TINY_MODEL, "data=toy", "data.num_per_class=4", "data.image_size=16", "global_batch_size=8", "log.every=1",
         "log.samples.every=0", "optim.lr=3e-3", "ema.decay=0.5", "ckpt.every=2", "ckpt.keep_last=null", "name=e"]
SAMPLING = {"sampler": "ddim", "num_steps": 5, "cfg_scale": 2.0, "guided_channels": "all"}
EVAL_KEYS = ["eval.every=2", "eval.num_samples=20", "eval.batch_size=10", "eval.labels=balanced",
             "eval.feature_extractor=toy_judge", *(f"eval.{k}={v}" for k, v in SAMPLING.items())]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A real reference (100 toy images of another seed) and a cache dir holding the judge."""
    root = tmp_path_factory.mktemp("eval_env")
    images, _ = make_toy_arrays(10, image_size=16, seed=1)
    ref = write_samples_npz(root / "real16.npz", images)
    return {"ref": ref, "cache": root / "cache"}


def eval_keys(env, metrics="[fid,isc]"):
    return [*EVAL_KEYS, f"eval.reference={env['ref']}", f"eval.cache_dir={env['cache']}", f"eval.metrics={metrics}"]


def eval_lines(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if any(k.startswith("eval/") for k in line)}


def eval_fid_metrics(env, checkpoint: Path, metrics: str, out: Path) -> dict:
    """What `python eval_fid.py checkpoint=... <the same keys>` computes, in-process."""
    cfg = compose_config("eval", [
        f"checkpoint={checkpoint}", f"reference={env['ref']}", "feature_extractor=toy_judge", f"metrics={metrics}",
        f"cache_dir={env['cache']}", "device=cpu", "results_table=null", f"sampler={SAMPLING['sampler']}",
        f"sampler.num_steps={SAMPLING['num_steps']}", f"guided_channels={SAMPLING['guided_channels']}",
        f"bulk.cfg_scale={SAMPLING['cfg_scale']}", "bulk.num_samples=20", "bulk.batch_size=10",
        "bulk.labels=balanced", f"bulk.out={out}"])
    return generate_and_evaluate(cfg)["metrics"]


def assert_same_scores(line: dict, metrics: dict, keys=("fid", "inception_score", "class_accuracy")):
    for key in keys:
        assert line[f"eval/{key}"] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key
    assert line["eval/num_samples"] == metrics["num_samples"] == 20


@pytest.fixture(scope="module")
def one_rank(env, tmp_path_factory):
    """2 steps evaluating fid only, then resumed to 4 steps with isc added (eval.* may change)."""
    run = tmp_path_factory.mktemp("one") / "run"
    with single_thread():
        run_training(train_config([*TRAIN, "max_steps=2", *eval_keys(env, "[fid]")]), run)
        run_training(train_config([*TRAIN, "max_steps=4", *eval_keys(env)]), run)
    return run


def test_eval_every_logs_the_judge_scores_that_eval_fid_gives_on_the_checkpoint_and_resumes(env, one_rank, tmp_path):
    lines = eval_lines(one_rank)
    assert sorted(lines) == [2, 4]  # the schedule continued across the resume
    assert "eval/inception_score" not in lines[2] and "eval/inception_score" in lines[4]
    assert lines[2]["eval/fid"] > 0 and 0 <= lines[4]["eval/class_accuracy"] <= 1
    with single_thread():
        at2 = eval_fid_metrics(env, one_rank / "checkpoints" / "0000002.pt", "[fid]", tmp_path / "s2.npz")
        at4 = eval_fid_metrics(env, one_rank / "checkpoints" / "0000004.pt", "[fid,isc]", tmp_path / "s4.npz")
    assert_same_scores(lines[2], at2, keys=("fid", "class_accuracy"))
    assert_same_scores(lines[4], at4)
    assert lines[2]["eval/fid"] != lines[4]["eval/fid"]  # the model changed between them


@pytest.mark.slow
def test_eval_every_on_two_gloo_ranks_equals_eval_fid_and_one_rank(env, one_rank, tmp_path):
    run = tmp_path / "run"
    proc = run_script("train.py", [*TRAIN, "max_steps=4", *eval_keys(env), f"hydra.run.dir={run}"], cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"}, ranks=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = eval_lines(run)
    assert sorted(lines) == [2, 4]
    with single_thread():
        at4 = eval_fid_metrics(env, run / "checkpoints" / "0000004.pt", "[fid,isc]", tmp_path / "s4.npz")
    assert_same_scores(lines[4], at4)
    # The same run on one rank (its parameters agree to ~1e-6): the same judge numbers, up to
    # the few pixels that such a difference can move by one level.
    single = eval_lines(one_rank)[4]
    assert lines[4]["eval/fid"] == pytest.approx(single["eval/fid"], rel=1e-3)
    assert lines[4]["eval/class_accuracy"] == pytest.approx(single["eval/class_accuracy"], abs=0.051)


def test_keep_best_keeps_the_checkpoint_of_the_lowest_fid_outside_keep_last(env, tmp_path):
    run = tmp_path / "run"
    keys = [*TRAIN, "max_steps=4", *eval_keys(env, "[fid]"), "eval.every=1", "eval.keep_best=true",
            "ckpt.every=1000", "ckpt.keep_last=1"]
    with single_thread():
        run_training(train_config(keys), run)
    lines = eval_lines(run)
    fids = {step: line["eval/fid"] for step, line in lines.items()}
    assert sorted(fids) == [1, 2, 3, 4]
    best_step = min(fids, key=lambda s: (fids[s], s))
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == best_step and best["value"] == fids[best_step] and best["metric"] == "fid"
    kept = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert kept["step"] == best_step
    # keep_last=1 pruned the other step checkpoints, never best.pt
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == sorted({"0000004.pt", "best.pt"})
    # the kept weights score what best.json says
    with single_thread():
        again = eval_fid_metrics(env, run / "checkpoints" / "best.pt", "[fid]", tmp_path / "b.npz")
    assert again["fid"] == pytest.approx(best["value"], rel=1e-6)


@pytest.mark.parametrize("keys, match", [
    (["eval.reference=null"], "eval.reference=PATH"),
    (["eval.reference=/nonexistent/ref.npz"], "does not exist"),
    (["eval.metrics=[fid,clip]"], "eval.metrics"),
    (["eval.keep_best=true", "eval.best_metric=inception_score"], "needs 'isc'"),
    (["eval.num_steps=1"], "eval sampler settings"),
])
def test_a_bad_eval_key_stops_the_run_at_start_up_before_any_step(env, tmp_path, keys, match):
    run = tmp_path / "run"
    with single_thread(), pytest.raises(ConfigError, match=match):
        run_training(train_config([*TRAIN, "max_steps=2", *eval_keys(env, "[fid]"), *keys]), run)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


def test_evaluating_leaves_the_training_bitwise_unchanged(one_rank, tmp_path):
    with single_thread():
        plain = run_training(train_config([*TRAIN, "max_steps=4"]), tmp_path / "plain")
    ours = torch.load(one_rank / "checkpoints" / "0000004.pt", weights_only=True)
    theirs = torch.load(plain["checkpoint"], weights_only=True)
    for part in ("model", "ema"):
        for key, value in theirs[part].items():
            assert torch.equal(ours[part][key], value), f"{part}.{key}"
