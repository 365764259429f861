"""Issue 22, item 10: which timesteps the respaced DDPM/DDIM samplers visit. `sample.py
sampler=ddim` (and ddpm) spaces N steps evenly over the chain, both ends included
(`sampler.spacing=linspace`, the default: N=10 visits 999, 888, ..., 111, 0); DiT's release
code's "ddimN" takes the integer stride s with len(range(0, T, s)) == N
(`sampler.spacing=ddim`: 900, 800, ..., 0), which is what the exported diffusers pipeline's
DDIMScheduler ("leading", offset 0) visits whenever N divides T. The default's records and
output names are what they were before the option existed."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import assert_one_line, run_program, tiny_dit

from dit.config import ConfigError, to_sample_config
from dit.diffusion import create_diffusion
from dit.io.checkpoint import save_atomic
from dit.io.export import diffusers_scheduler
from dit.sampling.diffusion import sampling_chain
from dit.sampling.loading import default_output_name
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import SamplerSettings

# The DDPM timesteps the network receives, in the order it receives them (T = 1000).
LINSPACE = {
    10: [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    50: [999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734, 714, 693, 673, 652, 632, 612, 591,
         571, 550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224, 204, 183, 163,
         143, 122, 102, 82, 61, 41, 20, 0],
    9: [999, 874, 749, 624, 500, 375, 250, 125, 0],
}
DIT_DDIM = {  # DiT's "ddimN": range(0, 1000, s) with exactly N entries
    10: list(range(900, -1, -100)),
    50: list(range(980, -1, -20)),
    9: [896, 784, 672, 560, 448, 336, 224, 112, 0],
}
# diffusers' DDIMScheduler, timestep_spacing="leading", steps_offset=0: k * (T // N), k < N.
DIFFUSERS_LEADING_9 = [888, 777, 666, 555, 444, 333, 222, 111, 0]

CHAIN = {"noise_schedule": "linear", "diffusion_steps": 1000}


def visited(sampler: str, num_steps: int, **knobs) -> list[int]:
    """The timesteps a sampler built from SamplerSettings hands the network, one per call."""
    seen = []

    def denoiser(x, t):
        assert len(set(t.tolist())) == 1
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    settings = SamplerSettings(sampler=sampler, num_steps=num_steps, cfg_scale=1.0, **knobs)
    built = build_sampler(settings, create_diffusion("", learn_sigma=False))
    built.sample(denoiser, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                 generator=torch.Generator().manual_seed(1))
    return seen


@pytest.mark.parametrize("n", [10, 50, 9])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_default_spacing_visits_both_ends_and_spacing_ddim_visits_dits_ddimN(sampler, n):
    assert SamplerSettings.spacing == "linspace"
    assert visited(sampler, n) == LINSPACE[n]
    assert visited(sampler, n, spacing="linspace") == LINSPACE[n]
    assert visited(sampler, n, spacing="ddim") == DIT_DDIM[n]
    # the same chain as DiT's create_diffusion("ddimN"), which its sample.py builds for DDIM
    chain = sampling_chain(create_diffusion("", learn_sigma=False), n, spacing="ddim")
    assert list(chain.timestep_map) == list(create_diffusion(f"ddim{n}", learn_sigma=False).timestep_map)


@pytest.mark.parametrize("n", [50, 10])
def test_the_exported_ddim_scheduler_visits_what_spacing_ddim_visits_when_n_divides_t(n):
    scheduler = diffusers_scheduler(CHAIN, "ddim")
    scheduler.set_timesteps(n)
    exported = scheduler.timesteps.tolist()
    assert exported == visited("ddim", n, spacing="ddim") == DIT_DDIM[n]
    assert exported != visited("ddim", n)  # the default spacing is not what the pipeline walks
    # diffusers steps from t to t - T // N: the next visited timestep when N divides T
    assert all(a - b == 1000 // n for a, b in zip(exported, exported[1:]))


def test_where_the_exported_scheduler_and_spacing_ddim_differ_n_not_dividing_t():
    """docs/export.md: for N = 9, diffusers visits multiples of T // N = 111; DiT's ddim9 has stride 112."""
    scheduler = diffusers_scheduler(CHAIN, "ddim")
    scheduler.set_timesteps(9)
    assert scheduler.timesteps.tolist() == DIFFUSERS_LEADING_9 != visited("ddim", 9, spacing="ddim")


def test_the_default_records_and_output_names_are_unchanged_and_spacing_ddim_is_marked():
    old_keys = {"sampler", "num_steps", "cfg_scale", "guided_channels", "guidance_interval", "eta", "clip_denoised",
                "precision"}  # a diffusion sampler's record before this option existed
    for name in ("ddpm", "ddim", "dpm++"):
        assert set(SamplerSettings(sampler=name).to_dict()) == old_keys
    record = SamplerSettings(sampler="ddim", num_steps=50, spacing="ddim").to_dict()
    assert set(record) == old_keys | {"spacing"} and record["spacing"] == "ddim"
    assert "spacing" not in SamplerSettings(sampler="euler").to_dict()

    provenance = {"checkpoint": "/x/DiT-XL-2-256x256.pt", "which": "ema", "step": None}
    assert default_output_name(provenance, SamplerSettings(sampler="ddim", num_steps=50), seed=0,
                               num_samples=8) == "DiT-XL-2-256x256-ema-ddim50-cfg1.5-g3-seed0-n8"
    assert default_output_name(provenance, SamplerSettings(sampler="ddim", num_steps=50, spacing="ddim"), seed=0,
                               num_samples=8) == "DiT-XL-2-256x256-ema-ddim50-cfg1.5-g3-ddimspacing-seed0-n8"


def test_a_spacing_that_cannot_work_is_refused_naming_the_fix(compose):
    with pytest.raises(ValueError, match="unknown spacing 'leading'.*linspace.*ddim"):
        SamplerSettings(sampler="ddim", spacing="leading").check()
    for name in ("dpm++", "euler", "sde"):
        with pytest.raises(ValueError, match=f"spacing=ddim.*ddpm and ddim.*the {re.escape(name)} sampler"):
            SamplerSettings(sampler=name, spacing="ddim").check()
    SamplerSettings(sampler="auto", spacing="ddim").check()  # decided once auto is resolved
    # No integer stride gives exactly 300 of 1000 steps: the nearest counts that exist are named.
    with pytest.raises(ValueError, match=r"spacing=ddim.*num_steps=300.*334 or 250.*spacing=linspace"):
        build_sampler(SamplerSettings(sampler="ddim", num_steps=300, spacing="ddim"), create_diffusion(""))
    with pytest.raises(ConfigError, match="sampler.spacing|unknown spacing"):
        to_sample_config(compose("sample", ["checkpoint=x.pt", "sampler=ddim", "sampler.spacing=leading"]))
    assert to_sample_config(compose("sample", ["checkpoint=x.pt", "sampler=ddim", "sampler.spacing=ddim"])) \
        .sampler_settings(1.0).spacing == "ddim"


def test_sample_py_refuses_a_step_count_no_stride_fits_in_one_line(tmp_path, capsys, monkeypatch):
    model = tiny_dit(in_channels=3, input_size=8)
    ckpt = tmp_path / "run.pt"
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 3, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "config": {"diffusion": {"noise_schedule": "linear", "diffusion_steps": 500}},
                 "format_version": 1}, ckpt)
    code, _, err = run_program("sample.py", [f"checkpoint={ckpt}", "device=cpu", "sampler=ddim", "sampler.spacing=ddim",
                                             "sampler.num_steps=150", "grid.labels=[0]",
                                             f"grid.out={tmp_path / 'g.png'}"], capsys, monkeypatch)
    assert_one_line(code, err, "spacing=ddim", "num_steps=150", "500", "linspace")
    assert not (tmp_path / "g.png").exists()
