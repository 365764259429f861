"""Fine-tuning with `init_from=` (issue 13): a new run (fresh optimizer, step 0, RNG from the
seed) whose model and EMA start from our checkpoint, a release-format state dict with 1000
classes, or weights of a smaller image size; a kill during the fine-tune resumes bitwise; wrong
uses are refused in one line. The tiny run of conftest.TOY_RUN (toy set, pixel space).

Why the losses are compared with a run from scratch: with the same seed, both runs draw the same
batches, timesteps and noise at every step, so the losses are paired and only the initial
weights differ.
"""

import json
import signal

import pytest
import torch
from dit.io.checkpoint import save_weights_safetensors
from dit.config import ConfigError
from dit.models import DiT, sincos_pos_embed_2d
from dit.train import run_training
from dit.train.init_from import fit_to_model, read_init_from
from dit.train.resume import checkpoint_path, list_checkpoints

from conftest import assert_same_training_state, joined, single_thread, start_training, toy_run_config as config

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20  # fine-tune length
LR = "optim.lr=1e-3"  # a tiny model learns visibly in a few dozen steps
# The model of the tiny run (conftest.TOY_RUN) as DiT arguments, at 16 px in pixel space.
ARCH = dict(patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(run_dir, step=STEPS) -> dict:
    return torch.load(checkpoint_path(run_dir / "checkpoints", step), weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained source run (60 steps; EMA decay 0.9 so that its EMA is the trained weights) and
    the runs from scratch that fine-tunes are compared with, at 16 and 32 px."""
    root = tmp_path_factory.mktemp("finetune")
    with single_thread():
        source = run_training(config("max_steps=60", LR, "ema.decay=0.9", "ckpt.every=1000"), root / "source")
        for name, size in (("scratch16", 16), ("scratch32", 32)):
            run_training(config(f"max_steps={STEPS}", LR, f"data.image_size={size}", "ckpt.every=1000"), root / name)
        # The fine-tune of the first test, also the uninterrupted run that the kill test ends as.
        run_training(config(f"max_steps={STEPS}", LR, "ckpt.every=1000", f"init_from={source['checkpoint']}"),
                     root / "tuned")
    return {"root": root, "source": source["checkpoint"], "source_losses": losses(root / "source")}


@pytest.fixture(scope="module")
def release_file(runs):
    """The source's EMA weights in a DiT built with 1000 classes, saved as a plain state dict
    (the official release's format): 1001 label rows, the null row (1000) the trained one."""
    ema = torch.load(runs["source"], weights_only=True)["ema"]
    big = DiT(input_size=16, num_classes=1000, **ARCH)
    sd = {k: (v if k != "y_embedder.embedding_table.weight" else big.state_dict()[k].clone()) for k, v in ema.items()}
    sd["y_embedder.embedding_table.weight"][1000] = ema["y_embedder.embedding_table.weight"][10]
    path = runs["root"] / "DiT-tiny-release.pt"
    torch.save(sd, path)
    return path


def assert_fine_tune_learns(tuned, scratch):
    """Lower than from scratch at every paired step (a clear margin on average), and falling."""
    assert len(tuned) == len(scratch) == STEPS
    assert all(a < b for a, b in zip(tuned, scratch)), (tuned, scratch)
    assert sum(scratch) / STEPS - sum(tuned) / STEPS > 0.2, (tuned, scratch)
    assert sum(tuned[-5:]) / 5 < sum(tuned[:5]) / 5, tuned


def test_fine_tune_from_our_checkpoint_starts_where_the_source_ended_with_a_fresh_optimizer(runs):
    run = runs["root"] / "tuned"  # init_from=<the source's checkpoint>, STEPS steps
    tuned = losses(run)
    assert_fine_tune_learns(tuned, losses(runs["root"] / "scratch16"))
    # The source ended near 0.58 (its last 10 steps); the fine-tune's first steps are there, not at ~1.
    src_end = sum(runs["source_losses"][-10:]) / 10
    assert abs(sum(tuned[:5]) / 5 - src_end) < 0.1, (tuned[:5], src_end)
    state = final(run)
    assert state["step"] == STEPS and state["config"]["init_from"] == runs["source"]
    # A fresh optimizer: Adam's step counters count this run's steps only.
    assert {int(s["step"]) for s in state["opt"]["state"].values()} == {STEPS}


def test_fine_tune_from_a_1000_class_release_file_into_the_10_class_toy_set(runs, release_file, tmp_path):
    run = tmp_path / "ft"
    run_training(config(f"max_steps={STEPS}", LR, "ckpt.every=1000", f"init_from={release_file}"), run)
    assert_fine_tune_learns(losses(run), losses(runs["root"] / "scratch16"))
    assert final(run)["ema"]["y_embedder.embedding_table.weight"].shape == (11, 32)


def test_fine_tune_from_16px_weights_into_a_32px_model(runs, tmp_path):
    run = tmp_path / "ft"
    run_training(config(f"max_steps={STEPS}", LR, "data.image_size=32", "ckpt.every=1000",
                        f"init_from={runs['source']}"), run)
    assert_fine_tune_learns(losses(run), losses(runs["root"] / "scratch32"))
    assert final(run)["model"]["pos_embed"].shape == (1, 64, 32)


def test_what_init_from_keeps_and_what_it_takes_from_the_model(runs, release_file, tmp_path):
    """Release file (1000 classes) into 10 classes: every tensor the file's except the label
    table, whose class rows are the model's own initialisation and whose null row is the file's;
    16 px into 32 px: the model's own sin-cos table for its 8x8 grid. A .safetensors copy of
    the file reads the same."""
    sd = torch.load(release_file, weights_only=True)
    safe = save_weights_safetensors(sd, tmp_path / "release.safetensors")
    for path in (release_file, safe):
        init = read_init_from(config(f"init_from={path}"), _one_rank(), None)
        assert init.source_config is None and init.state_dict.keys() == sd.keys()
        model = DiT(input_size=16, num_classes=10, **ARCH)
        own = {k: v.clone() for k, v in model.state_dict().items()}
        fitted, notes = fit_to_model(init, model)
        table = fitted["y_embedder.embedding_table.weight"]
        assert table.shape == (11, 32)
        assert torch.equal(table[:10], own["y_embedder.embedding_table.weight"][:10])
        assert torch.equal(table[10], sd["y_embedder.embedding_table.weight"][1000])
        assert all(torch.equal(fitted[k], sd[k]) for k in sd if k != "y_embedder.embedding_table.weight")
        assert any("null row copied" in n for n in notes)

    init = read_init_from(config(f"init_from={runs['source']}", "init_from_weights=model"), _one_rank(), None)
    assert init.source_config["num_classes"] == 10
    big = DiT(input_size=32, num_classes=10, **ARCH)
    fitted, _ = fit_to_model(init, big)
    assert torch.equal(fitted["pos_embed"][0], sincos_pos_embed_2d(32, 8).float())
    assert torch.equal(fitted["y_embedder.embedding_table.weight"], init.state_dict["y_embedder.embedding_table.weight"])
    assert all(torch.equal(fitted[k], v) for k, v in init.state_dict.items() if k != "pos_embed")
    # What no tensor shape shows is checked against the file's recorded config.
    with pytest.raises(ConfigError, match=r"1 mismatches.*: num_heads: file 2 vs model 4\. Set model"):
        fit_to_model(init, DiT(input_size=16, num_classes=10, **(ARCH | {"num_heads": 4})))


def _one_rank():
    from dit.distributed import DistEnv

    return DistEnv(0, 0, 1, torch.device("cpu"))


def test_a_kill_during_a_fine_tune_resumes_bitwise_from_the_run_directory(runs, tmp_path):
    """Killed (SIGKILL) after step 12 with checkpoints every 5 steps, relaunched with the same
    command (init_from still set): the run continues from its own step-10 checkpoint and ends
    bitwise equal to an uninterrupted fine-tune."""
    common = [f"max_steps={STEPS}", LR, f"init_from={runs['source']}"]
    run = tmp_path / "run"
    killed = start_training(config(*common, "ckpt.every=5", "debug.kill_at_step=12"), run)
    assert joined(killed) == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5, 10]
    run_training(config(*common, "ckpt.every=5"), run)
    assert_same_training_state(final(run), final(runs["root"] / "tuned"))
    assert losses(run) == losses(runs["root"] / "tuned")  # steps 11-12 redone, logged once


def _refusal(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_wrong_uses_are_refused_in_one_line_before_training(runs, release_file, tmp_path):
    # Another depth: the tensors that do not fit, by name and shape.
    with pytest.raises(ConfigError) as err:
        run_training(config("max_steps=2", "model.depth=3", f"init_from={runs['source']}"), tmp_path / "a")
    message = _refusal(err)
    assert "does not fit the model" in message and "blocks.2.attn.qkv.weight missing from the file (model (96, 32))" in message
    # Another width: the shapes of both sides.
    with pytest.raises(ConfigError) as err:
        run_training(config("max_steps=2", "model.hidden_size=64", f"init_from={release_file}"), tmp_path / "b")
    assert "x_embedder.proj.weight: file (32, 3, 4, 4) vs model (64, 3, 4, 4)" in _refusal(err)
    # resume= with weights that are not a training checkpoint: points to init_from=.
    with pytest.raises(ConfigError) as err:
        run_training(config("max_steps=2", f"resume={release_file}"), tmp_path / "c")
    assert "is not a training checkpoint" in _refusal(err) and f"use init_from={release_file}" in str(err.value)
    # A missing file; both resume= and init_from=; a bad choice of weights.
    with pytest.raises(ConfigError) as err:
        run_training(config("max_steps=2", f"init_from={tmp_path / 'nope.pt'}"), tmp_path / "d")
    assert "no such file or directory" in _refusal(err)
    with pytest.raises(ConfigError) as err:
        run_training(config("max_steps=2", f"init_from={release_file}", f"resume={runs['source']}"), tmp_path / "e")
    assert "keep one of them" in _refusal(err)
    with pytest.raises(ConfigError) as err:
        run_training(config("max_steps=2", f"init_from={runs['source']}", "init_from_weights=best"), tmp_path / "f")
    assert "init_from_weights='best'" in _refusal(err)
    assert not any((tmp_path / d / "checkpoints").exists() for d in "abcdef")
