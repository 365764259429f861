"""Issue 21, item 9: `precision=fp16 optim.loss_scale_init=inf` skipped every step (the scaled
gradient always overflows, and halving inf leaves inf), wrote a checkpoint with scale inf and
exited 0. The initial scale must be finite, and a checkpoint holding a non-finite scale is
refused on resume instead of skipping every step again."""

import math

import pytest
import torch

from dit.config import ConfigError
from dit.io.checkpoint import save_atomic, with_checksum
from dit.train import run_training
from dit.train.resume import checkpoint_path

from conftest import toy_run_config

FP16 = ("precision=fp16", "ckpt.every=2")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_an_infinite_initial_loss_scale_is_refused_before_training(tmp_path, value, one_thread):
    with pytest.raises(ConfigError, match=f"optim.loss_scale_init must be positive and finite.*got {value}"):
        run_training(toy_run_config(*FP16, "max_steps=2", f"optim.loss_scale_init={value}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_with_an_infinite_loss_scale_is_refused_on_resume(tmp_path, one_thread):
    run = tmp_path / "run"
    run_training(toy_run_config(*FP16, "max_steps=2"), run)
    path = checkpoint_path(run / "checkpoints", 2)
    state = torch.load(path, weights_only=True)
    assert math.isfinite(state["scaler"]["scale"])
    state.pop("checksum", None)
    state["scaler"]["scale"] = math.inf  # what a run started with loss_scale_init=inf saved
    save_atomic(with_checksum(state), path)
    with pytest.raises(ValueError, match="fp16 loss scale is inf: every step would overflow"):
        run_training(toy_run_config(*FP16, "max_steps=4"), run)
