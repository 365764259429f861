"""Issue 23, item 2: in-training evaluation (`eval.every`) can be interrupted and says what it
does. A preemption signal during a pass is honoured during it (one process: before the next
network evaluation): `train.py` exits 75 within seconds (at most 30 s: a cluster's grace period)
with the checkpoint of that step on disk and no scores of the pass; the
relaunch evaluates that step first and finishes the run, logging the scores an uninterrupted run
logs. A pass shows a progress bar and its expected duration; start-up says what a pass samples
and how long it takes; eval.num_samples left unset is sized for the run.

Real `train.py` processes on the quickstart model (experiment=quickstart: depth 4, width 128, 16 px
toy images in pixel space), 4 steps, evaluated at steps 2 and 4 by the toy judge on 48 samples in
4 batches (DDIM-5, guided); the reference is the same run in this process, uninterrupted.
"""

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_same_training_state, single_thread, start_script, train_config
from dit.data.toy import make_toy_arrays
from dit.io.npz import write_samples_npz
from dit.train import run_training
from dit.train.resume import checkpoint_path, list_checkpoints

RUN = ["experiment=quickstart", "data.num_per_class=4", "data.num_workers=0", "max_steps=4", "log.every=1",
       "log.samples.every=0", "name=q"]  # the quickstart keeps only its final checkpoint (ckpt.every=1000000)
EVAL = ["eval.every=2", "eval.feature_extractor=toy_judge", "eval.metrics=[fid]", "eval.num_samples=48",
        "eval.batch_size=12", "eval.labels=balanced", "eval.sampler=ddim", "eval.num_steps=5", "eval.cfg_scale=2.0",
        "eval.guided_channels=all"]
PASS_STARTS = "eval at step {}: sampling"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_preemption")
    images, _ = make_toy_arrays(10, image_size=16, seed=1)
    ref = write_samples_npz(root / "real16.npz", images)
    return [*RUN, *EVAL, f"eval.reference={ref}", f"eval.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def reference(keys, tmp_path_factory):
    """The run uninterrupted, in this process (one thread, as the processes below): its eval lines
    and final checkpoint. It also trains the toy judge into the shared cache."""
    run = tmp_path_factory.mktemp("reference") / "run"
    with single_thread():
        result = run_training(train_config(keys), run)
    return {"lines": eval_lines(run), "final": torch.load(result["checkpoint"], weights_only=True)}


def eval_lines(run: Path) -> dict[int, dict]:
    path = run / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {line["step"]: line for line in lines if any(k.startswith("eval/") for k in line)}


def logged_steps(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "train/loss" in line]


class Launch:
    """`train.py <keys> hydra.run.dir=<run>` with its output (stdout and stderr) read as it comes;
    `signal_when(text, signum)` sends the signal the moment `text` appears in the output."""

    def __init__(self, keys, run: Path, cwd: Path):
        self.proc = start_script("train.py", [*keys, f"hydra.run.dir={run}"], cwd=cwd, env={"OMP_NUM_THREADS": "1"})
        self.output, self.signalled = "", None
        self._wanted: tuple[str, int] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def signal_when(self, text: str, signum: int) -> None:
        self._wanted = (text, signum)

    def _read(self) -> None:
        for line in self.proc.stdout:  # a log line is flushed as it is written
            self.output += line
            if self._wanted is not None and self.signalled is None and self._wanted[0] in line:
                self.proc.send_signal(self._wanted[1])
                self.signalled = time.monotonic()

    def wait(self, timeout: float = 180) -> tuple[int, float | None]:
        """(exit status, seconds from the signal to the exit, or None when none was sent)."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        ended = time.monotonic()
        self._reader.join(timeout=10)
        return code, None if self.signalled is None else ended - self.signalled


@pytest.fixture(scope="module")
def preempted(keys, reference, tmp_path_factory):
    """SIGTERM as the pass of step 2 starts; the relaunch SIGTERMed as its redo of that pass starts;
    a second relaunch runs to the end. What each left behind, and its output."""
    cwd = tmp_path_factory.mktemp("preempted")
    run = cwd / "run"
    out = {}
    first = Launch(keys, run, cwd)
    first.signal_when(PASS_STARTS.format(2), signal.SIGTERM)
    out["first"] = (*first.wait(), first.output)
    out["after_first"] = {"checkpoints": [s for s, _ in list_checkpoints(run / "checkpoints")],
                          "evals": eval_lines(run), "steps": logged_steps(run),
                          "state": torch.load(checkpoint_path(run / "checkpoints", 2), weights_only=True)
                          if (run / "checkpoints").is_dir() and checkpoint_path(run / "checkpoints", 2).is_file()
                          else None}
    second = Launch(keys, run, cwd)
    second.signal_when(PASS_STARTS.format(2), signal.SIGTERM)
    out["second"] = (*second.wait(), second.output)
    out["after_second"] = {"checkpoints": [s for s, _ in list_checkpoints(run / "checkpoints")],
                           "evals": eval_lines(run)}
    third = Launch(keys, run, cwd)
    out["third"] = (*third.wait(), third.output)
    out["run"] = run
    return out


@pytest.mark.slow
def test_sigterm_during_an_eval_pass_exits_75_within_30_s_with_the_step_checkpointed_and_no_scores(preempted):
    code, took, output = preempted["first"]
    assert code == 75, (code, output[-4000:])
    assert took is not None and took < 30, took  # a cluster's grace period; here about a sampling batch
    print(f"\nSIGTERM during the eval pass of step 2 -> exit 75 after {took:.2f} s")
    after = preempted["after_first"]
    assert after["checkpoints"] == [2]  # written by the preemption (the quickstart checkpoints only at its end)
    assert after["state"] is not None and after["state"]["step"] == 2
    assert after["steps"] == [1, 2] and after["evals"] == {}  # no scores of the interrupted pass
    assert "its evaluation was stopped: the relaunch does it first" in output


@pytest.mark.slow
def test_sigterm_during_the_redone_pass_exits_75_writing_nothing(preempted):
    code, took, output = preempted["second"]
    assert code == 75, (code, output[-4000:])
    assert took is not None and took < 30, took
    assert "step 2: its evaluation was interrupted by a preemption: evaluating it now" in output
    assert preempted["after_second"] == {"checkpoints": [2], "evals": {}}


@pytest.mark.slow
def test_the_relaunch_evaluates_the_interrupted_step_first_and_ends_as_the_uninterrupted_run(preempted, reference):
    code, _, output = preempted["third"]
    assert code == 0, output[-4000:]
    run = preempted["run"]
    ours, theirs = eval_lines(run), reference["lines"]
    assert sorted(ours) == sorted(theirs) == [2, 4]
    for step in (2, 4):
        assert ours[step]["eval/num_samples"] == theirs[step]["eval/num_samples"] == 48
        for key in ("eval/fid", "eval/class_accuracy"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert logged_steps(run) == [1, 2, 3, 4]  # nothing logged twice
    final = torch.load(checkpoint_path(run / "checkpoints", 4), weights_only=True)
    assert_same_training_state(final, reference["final"])
    assert output.index(PASS_STARTS.format(2)) < output.index(PASS_STARTS.format(4))


@pytest.mark.slow
def test_a_pass_shows_a_progress_bar_and_its_expected_duration(preempted):
    output = preempted["third"][2]
    counts = [int(n) for n in re.findall(r"eval at step 4: +\d+%\|[^\r\n]*?\| *(\d+)/48 ", output)]
    assert counts and max(counts) >= 12, output[-4000:]  # tqdm's bar over the pass's samples
    assert re.search(r"eval at step 4: first batch sampled in [\d.]+ s: about [\d.]+ s to sample this pass's "
                     r"4 batches", output), output[-4000:]


@pytest.mark.slow
def test_start_up_says_what_a_pass_samples_and_how_long_it_takes(preempted):
    output = preempted["third"][2]
    found = re.search(r"eval\.every=2: each pass samples 48 images \(ddim, 5 steps, guidance 2: 5 network "
                      r"evaluations per image on a doubled batch\) in 4 batches of 12 and scores them with toy_judge: "
                      r"about ([\d.]+) s of sampling per pass", output)
    assert found, output[-4000:]
    assert float(found.group(1)) > 0


def test_eval_num_samples_left_unset_is_sized_for_the_run():
    """The issue's flow run (quickstart, eval.every=500, SiT's SDE-250 by default) no longer samples
    5000 images a pass (26 times the training between two passes): 500. A paper-scale run keeps
    FID-5K; a number that is set is kept."""
    from dit.train.evaluation import SIZED_NUM_SAMPLES, eval_settings, resolve_num_samples, sized_num_samples

    flow = train_config(["experiment=quickstart", "objective=flow", "eval.every=500"])
    assert flow.eval.num_samples is None
    assert resolve_num_samples(flow, "flow") == 500
    assert resolve_num_samples(train_config(["experiment=quickstart", "objective=flow", "eval.every=500",
                                             "eval.num_samples=64"]), "flow") == 64
    paper = train_config(["experiment=DiT-XL-2-256", "data.root=/data/imagenet/train", "eval.every=10000"])
    assert resolve_num_samples(paper, "diffusion") == 5000
    # the ladder, by the training between two passes (DDPM-250, no guidance: 250 passes per image)
    settings = eval_settings(paper.eval, "diffusion")
    assert [sized_num_samples(settings, every, 10 ** 6, 256) for every in (10000, 2000, 700, 400, 10)] == [
        5000, 2000, 1000, 500, 500]
    assert SIZED_NUM_SAMPLES == (5000, 2000, 1000, 500)
