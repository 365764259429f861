"""Issue 21, item 14: `init_from=` a file with NaN weights is refused when it is read, naming the
tensor, instead of stopping at step 1 with a non-finite update that blames the optimizer."""

import pytest
import torch

from dit.config import ConfigError
from dit.models import DiT
from dit.train import run_training

from conftest import toy_run_config

ARCH = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("fmt", ["state_dict", "ours"])
def test_init_from_weights_with_nan_are_refused_at_load_naming_the_tensor(tmp_path, fmt, one_thread):
    sd = DiT(**ARCH).state_dict()
    sd["blocks.1.attn.qkv.weight"][3, 5] = float("nan")
    sd["final_layer.linear.bias"][0] = float("inf")
    path = tmp_path / "diverged.pt"
    torch.save(sd if fmt == "state_dict" else {"model": sd, "ema": sd, "step": 7}, path)
    with pytest.raises(ConfigError) as err:
        run_training(toy_run_config("max_steps=2", f"init_from={path}"), tmp_path / "run")
    message = str(err.value)
    assert "non-finite values (NaN/inf)" in message
    assert "blocks.1.attn.qkv.weight (1 of 3072)" in message and "final_layer.linear.bias (1 of 96)" in message
    assert "optim.eps" not in message  # not blamed on an update
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
