"""Sampling walks the diffusion chain the model was trained on: a run trained with a cosine
schedule or 500 diffusion steps is sampled (DDPM, DDIM, DPM-Solver++) on its own betas, read from
the config its checkpoint records; a release file (a plain state dict, no config) gets DiT's
linear 1000-step chain. Respacing respaces the trained chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dit.sampling.diffusion as diffusion_samplers
from dit.sampling.diffusion import sampling_chain
from dit.sampling.images import SampleOrder, generate_samples
from dit.sampling.samplers import build_sampler
from dit.sampling.loading import load_for_sampling, settings_path_for
from dit.sampling.settings import SamplerSettings
from dit.sampling.trained import diffusion_from_config
from dit.io.checkpoint import save_atomic
from dit.diffusion import create_diffusion, linear_betas, named_betas, space_timesteps
from dit.train.resume import plain_config

from conftest import TINY_MODEL, tiny_dit, train_config

# A 2-block DiT on 8x8 pixels, as tests/train/test_train.py trains them.
TINY_RUN = [*TINY_MODEL, "data=toy", "data.num_per_class=2", "data.image_size=8", "data.num_workers=0",
            "log.samples.every=0", "global_batch_size=4", "max_steps=1", "log.every=1", "name=chain"]


def our_checkpoint(path: Path, overrides: list[str]) -> Path:
    """A tiny pixel-space DiT in our checkpoint format, with the training config that
    `python train.py <overrides>` composes, as the trainer stores it (plain_config)."""
    model = tiny_dit(in_channels=3, input_size=8)
    config = plain_config(train_config([*TINY_RUN, *overrides]))
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 3, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "config": config, "format_version": 1}, path)
    return path


class ChainSpy:
    """Records the betas of the chains the samplers are handed in dit.sampling (and still runs them)."""

    def __init__(self, monkeypatch):
        self.respaced, self.dpm = [], []
        chain, solver = diffusion_samplers.sampling_chain, diffusion_samplers.dpm_solver

        def sampling_chain(diffusion, num_steps, **kwargs):  # kwargs: the sampler's spacing
            out = chain(diffusion, num_steps, **kwargs)
            self.respaced.append((diffusion, out))
            return out

        def dpm_solver(denoiser, diffusion, *args, **kwargs):
            self.dpm.append(diffusion)
            return solver(denoiser, diffusion, *args, **kwargs)

        monkeypatch.setattr(diffusion_samplers, "sampling_chain", sampling_chain)
        monkeypatch.setattr(diffusion_samplers, "dpm_solver", dpm_solver)


@pytest.mark.parametrize("schedule, steps", [("cosine", 1000), ("linear", 500)])
def test_sample_py_samples_a_checkpoint_with_the_chain_it_was_trained_on(tmp_path, compose, monkeypatch,
                                                                          schedule, steps):
    from dit.sampling.generate import generate_bulk, generate_grid

    ckpt = our_checkpoint(tmp_path / "run.pt",
                          [f"diffusion.noise_schedule={schedule}", f"diffusion.diffusion_steps={steps}"])
    trained = create_diffusion("", noise_schedule=schedule, diffusion_steps=steps)  # what the trainer builds
    np.testing.assert_array_equal(trained.betas, named_betas(schedule, steps))
    spy = ChainSpy(monkeypatch)
    common = [f"checkpoint={ckpt}", "device=cpu", "grid.labels=[0,1]", "bulk.num_samples=2", "bulk.batch_size=2"]
    grid = generate_grid(compose("sample", [*common, "sampler=ddpm", "sampler.num_steps=3",
                                            f"grid.out={tmp_path / 'g.png'}"]))
    bulk = generate_bulk(compose("sample", [*common, "mode=bulk", "sampler=dpm++", "sampler.num_steps=2",
                                            f"bulk.out={tmp_path / 'b.npz'}"]))

    (full, respaced), = spy.respaced
    np.testing.assert_array_equal(full.betas, trained.betas)  # ddpm: the trained chain ...
    assert full.learns_sigma
    use = space_timesteps(steps, "3")
    np.testing.assert_array_equal(respaced.timestep_map, use)  # ... respaced within its own steps
    assert respaced.timestep_map.max() == steps - 1
    np.testing.assert_allclose(respaced.alphas_cumprod, trained.alphas_cumprod[use], rtol=1e-8)
    (dpm,) = spy.dpm
    np.testing.assert_array_equal(dpm.betas, trained.betas)  # dpm++ gets the same betas
    for out in (grid, bulk):
        recorded = json.loads(settings_path_for(out).read_text())
        assert recorded["diffusion"] == {"noise_schedule": schedule, "diffusion_steps": steps}


def test_respacing_a_500_step_chain_to_250_keeps_both_ends_and_its_noise_levels():
    trained = diffusion_from_config({"diffusion": {"noise_schedule": "linear", "diffusion_steps": 500}}, True)
    np.testing.assert_array_equal(trained.betas, linear_betas(500))
    chain = sampling_chain(trained, 250)
    assert chain.num_timesteps == 250 and chain.timestep_map[0] == 0 and chain.timestep_map[-1] == 499
    np.testing.assert_array_equal(chain.timestep_map, space_timesteps(500, "250"))
    assert set(np.diff(chain.timestep_map).tolist()) <= {2, 3}  # evenly spread over 0..499
    np.testing.assert_allclose(chain.alphas_cumprod, np.cumprod(1 - linear_betas(500))[chain.timestep_map], rtol=1e-8)
    with pytest.raises(ValueError, match="more than the 500 steps.*num_steps <= 500"):
        sampling_chain(trained, 501)


def test_a_release_file_samples_with_the_linear_1000_step_chain(tmp_path, monkeypatch):
    model = tiny_dit(in_channels=3, input_size=8, patch_size=8, depth=12, hidden_size=384, num_heads=6)  # DiT-S/8
    release = tmp_path / "release.pt"
    torch.save(model.state_dict(), release)  # the release format: a plain EMA state dict
    _, autoencoder, provenance = load_for_sampling(release, vae="pixel")
    assert provenance["diffusion"] == {"noise_schedule": "linear", "diffusion_steps": 1000}
    diffusion = diffusion_from_config(provenance, model.config.learn_sigma)
    np.testing.assert_array_equal(diffusion.betas, linear_betas(1000))
    np.testing.assert_array_equal(diffusion.betas, create_diffusion("").betas)
    assert diffusion_from_config(None, False).var_type.value == "fixed_large"


def test_a_config_the_code_cannot_build_names_the_key():
    with pytest.raises(ValueError, match="diffusion.noise_schedule='sigmoid'"):
        diffusion_from_config({"diffusion": {"noise_schedule": "sigmoid", "diffusion_steps": 1000}}, True)
    with pytest.raises(ValueError, match="diffusion.diffusion_steps='many'"):
        diffusion_from_config({"diffusion": {"diffusion_steps": "many"}}, True)
    with pytest.raises(TypeError, match="mapping"):
        diffusion_from_config("cosine", True)


def test_a_trained_cosine_500_step_run_samples_with_its_own_betas(tmp_path, monkeypatch):
    """The real trainer writes the checkpoint: its recorded config is what sampling reads."""
    from dit.train import run_training

    result = run_training(train_config([*TINY_RUN, "diffusion.noise_schedule=cosine",
                                        "diffusion.diffusion_steps=500"]), tmp_path / "run")
    model, autoencoder, provenance = load_for_sampling(result["checkpoint"])
    diffusion = diffusion_from_config(provenance, model.config.learn_sigma)
    np.testing.assert_array_equal(diffusion.betas, named_betas("cosine", 500))
    spy = ChainSpy(monkeypatch)
    generate_samples(model, build_sampler(SamplerSettings(sampler="ddim", num_steps=4), diffusion, autoencoder),
                     autoencoder, [0], SampleOrder(seed=0, batch_size=1))
    (full, respaced), = spy.respaced
    np.testing.assert_array_equal(full.betas, named_betas("cosine", 500))
    assert respaced.timestep_map.tolist() == space_timesteps(500, "4")
