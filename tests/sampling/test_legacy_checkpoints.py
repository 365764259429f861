"""Checkpoints written before the sampling package existed still load, and every sampler gives
the images it gave then.

`legacy/diffusion.pt` and `legacy/flow.pt` are 20-step runs of a 2-block DiT on the 16x16 toy set
in pixel space (`train.py` of commit ed6dab3, the last commit before `dit/sampling/`), and
`legacy/<objective>-<sampler>.npz` the bulk samples `sample.py mode=bulk` made from them then
(which=model, 6 steps, 6 samples in batches of 4, cfg 2.0, seed 3; one CPU thread). On the machine
that recorded them the new code gives equal bytes; on another CPU the float32 kernels round
differently, so a pixel may land on the neighbouring uint8 level (see `assert_same_images`).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_program

LEGACY = Path(__file__).resolve().parent / "legacy"

CASES = {  # file stem: (checkpoint, sample.py overrides)
    "diffusion-ddpm": ("diffusion", ["sampler=ddpm"]),
    "diffusion-ddim": ("diffusion", ["sampler=ddim"]),
    "diffusion-ddim-eta1": ("diffusion", ["sampler=ddim", "sampler.eta=1.0"]),
    "diffusion-dpm++": ("diffusion", ["sampler=dpm++"]),
    "flow-euler": ("flow", ["sampler=euler"]),
    "flow-heun": ("flow", ["sampler=heun"]),
    "flow-dopri5": ("flow", ["sampler=dopri5"]),
    "flow-sde": ("flow", ["sampler=sde"]),
}


def assert_same_images(new: np.ndarray, old: np.ndarray) -> None:
    """uint8 images equal up to one level where float32 rounding on another CPU crosses a .5
    boundary of 127.5 x + 128: at most one level anywhere, and on at most 2 % of the values (a
    change of a sampler's arithmetic moves most values by many levels)."""
    assert new.shape == old.shape and new.dtype == old.dtype == np.uint8
    diff = np.abs(new.astype(np.int16) - old.astype(np.int16))
    assert diff.max() <= 1, f"largest difference {diff.max()} levels"
    assert (diff > 0).mean() <= 0.02, f"{(diff > 0).mean():.1%} of the values differ"


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_checkpoint_from_before_the_sampling_package_samples_the_same_images(case, tmp_path, capsys, monkeypatch,
                                                                                 one_thread):
    checkpoint, sampler = CASES[case]
    out = tmp_path / f"{case}.npz"
    code, stdout, stderr = run_program(
        "sample.py", [f"checkpoint={LEGACY / checkpoint}.pt", "which=model", "mode=bulk", *sampler,
                      "sampler.num_steps=6", "bulk.num_samples=6", "bulk.batch_size=4", "bulk.cfg_scale=2.0",
                      f"bulk.out={out}", "seed=3"], capsys, monkeypatch)
    assert code == 0, stderr
    new, old = np.load(out), np.load(LEGACY / f"{case}.npz")
    np.testing.assert_array_equal(new["arr_1"], old["arr_1"])  # the labels: integers, equal anywhere
    assert_same_images(new["arr_0"], old["arr_0"])
    assert old["arr_0"].std() > 20  # the recorded samples are images, not a constant


def test_the_legacy_checkpoints_are_weights_only_files_of_each_objective():
    for name, kind in (("diffusion", None), ("flow", "flow")):
        ckpt = torch.load(LEGACY / f"{name}.pt", weights_only=True)
        assert {"model", "ema", "opt", "step", "config"} <= set(ckpt)
        assert ckpt["step"] == 20
        assert (ckpt["config"].get("objective") or {}).get("kind", None) in ((kind,) if kind else (None, "diffusion"))
