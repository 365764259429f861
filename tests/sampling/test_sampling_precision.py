"""Two sampler settings that change the arithmetic: `clip_denoised` (each step's x0 clamped to
[-1, 1], automatic for pixel models, as ADM samples them) and `precision` (fp32 with TF32 forced
off, tf32, bf16 autocast on the network only). Defaults for latent models are unchanged bit for
bit; both choices are recorded next to the samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dit.sampling.images import sample_latents
from dit.sampling.loading import settings_path_for
from dit.sampling.order import initial_noise, sample_generators
from dit.sampling.settings import SamplerSettings
from dit.io.checkpoint import save_atomic
from dit.diffusion import GaussianDiffusion, create_diffusion, linear_betas

from conftest import tiny_dit


class Pixel:
    name, latent_channels, downsample_factor, scale_factor = "pixel", 3, 1, 1.0

    def decode(self, z):
        return z


def pixel_model(noise=0.5):
    return tiny_dit(in_channels=3, noise=noise)  # large output weights: x0 predictions leave [-1, 1]


def run(model, settings, labels=(0, 1), seed=0):
    gens = sample_generators(seed, range(len(labels)))
    cfg = model.config
    noise = initial_noise(gens, (cfg.in_channels, cfg.input_size, cfg.input_size))
    return sample_latents(model, None, torch.tensor(labels), settings, noise=noise, generator=gens), noise


def alpha_bar(t: int) -> float:
    return float(np.cumprod(1 - linear_betas(1000))[t])


def x0_from_eps(x, eps, t):
    a = alpha_bar(t)
    return (x - (1 - a) ** 0.5 * eps) / a**0.5


# ------------------------------------------------------------------------------ clipping


def test_clip_is_automatic_on_for_pixel_and_off_for_latent_autoencoders():
    auto = SamplerSettings()
    assert auto.clip_denoised is None
    assert auto.resolved(Pixel()).clip_denoised is True
    latent = type("VAE", (), {"name": "sd-ema"})()
    assert auto.resolved(latent).clip_denoised is False
    assert SamplerSettings(clip_denoised=False).resolved(Pixel()).clip_denoised is False
    with pytest.raises(ValueError, match="clip_denoised must be true, false or null"):
        SamplerSettings(clip_denoised="yes").check()


def test_ddim_with_clipping_equals_an_independent_two_step_computation():
    """DDIM (eta 0) over the 2-step chain {999, 0}: x0 at t=999 clamped, moved to t=0, then x0 at
    t=0 clamped is the sample. Without clipping the same formulas, unclamped."""
    model = pixel_model()
    y = torch.tensor([0, 1])
    for clip in (True, False):
        out, x = run(model, SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=1.0, clip_denoised=clip))
        with torch.no_grad():
            x0 = x0_from_eps(x.double(), model(x, torch.full((2,), 999), y)[:, :3].double(), 999)
            x0 = x0.clamp(-1, 1) if clip else x0
            eps = (x.double() - alpha_bar(999) ** 0.5 * x0) / (1 - alpha_bar(999)) ** 0.5
            x_0 = alpha_bar(0) ** 0.5 * x0 + (1 - alpha_bar(0)) ** 0.5 * eps  # to t=0 (alpha_bar_prev = a_0)
            final = x0_from_eps(x_0, model(x_0.float(), torch.zeros(2, dtype=torch.long), y)[:, :3].double(), 0)
            final = final.clamp(-1, 1) if clip else final
        torch.testing.assert_close(out.double(), final, rtol=1e-4, atol=1e-5)
        if clip:
            assert out.abs().max() <= 1 and (out.abs() == 1).any()  # clamped, and clamping mattered
        else:
            assert out.abs().max() > 1.5


def test_ddpm_uses_only_clamped_x0_in_the_posterior_mean(monkeypatch):
    seen = []
    posterior = GaussianDiffusion.q_posterior_mean_variance

    def spy(self, x_start, x_t, t):
        seen.append(x_start.abs().max().item())
        return posterior(self, x_start, x_t, t)

    monkeypatch.setattr(GaussianDiffusion, "q_posterior_mean_variance", spy)
    model = tiny_dit(in_channels=3, noise=0.5, learn_sigma=False)  # fixed variance: stays finite unclipped
    run(model, SamplerSettings(num_steps=3, cfg_scale=2.0, clip_denoised=True))
    assert len(seen) == 3 and max(seen) <= 1.0
    seen.clear()
    run(model, SamplerSettings(num_steps=3, cfg_scale=2.0, clip_denoised=False))
    assert len(seen) == 3 and max(seen) > 1.0  # the spy sees unclamped values when clipping is off


def test_one_step_dpm_solver_with_clipping_is_the_clamped_x0():
    """DPM-Solver++ with one step jumps from t=999 straight to its x0 prediction."""
    model = pixel_model()
    y = torch.tensor([0, 1])
    for clip in (True, False):
        out, x = run(model, SamplerSettings(sampler="dpm++", num_steps=1, cfg_scale=1.0, clip_denoised=clip))
        with torch.no_grad():
            x0 = x0_from_eps(x.double(), model(x, torch.full((2,), 999), y)[:, :3].double(), 999)
        expected = x0.clamp(-1, 1) if clip else x0
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
        assert (out.abs().max() <= 1) == clip


def test_the_default_latent_sampler_is_the_plain_unclipped_fp32_chain():
    """What sampling computed before these settings existed: the respaced chain's DDPM loop with
    the raw conditional network, bit for bit."""
    model = tiny_dit()
    settings = SamplerSettings(num_steps=3, cfg_scale=1.0)
    out, noise = run(model, settings)
    gens = sample_generators(0, range(2))
    initial_noise(gens, noise.shape[1:])  # advance the generators past the initial noise, as run() did
    y = torch.tensor([0, 1])
    with torch.no_grad():
        plain = create_diffusion("3").p_sample_loop(lambda x, t: model(x, t, y), noise.shape, noise=noise,
                                                    generator=gens)
    assert torch.equal(out, plain)


# ------------------------------------------------------------------------------ precision


def test_backend_flags_inside_the_forward_are_as_asked_and_restored_after():
    model = tiny_dit()
    seen = []
    model.x_embedder.register_forward_pre_hook(lambda *_: seen.append(
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
         torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"  # as training with tf32=true leaves them
        for precision, flags, autocast in (("fp32", "ieee", False), ("tf32", "tf32", False), ("bf16", "ieee", True)):
            seen.clear()
            run(model, SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=2.0, precision=precision))
            assert len(seen) == 2  # one guided pass per step
            for m, c, enabled, dtype in seen:
                assert (m, c, enabled) == (flags, flags, autocast), precision
                if autocast:
                    assert dtype == torch.bfloat16
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")  # restored
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    with pytest.raises(ValueError, match="unknown precision 'fp16'.*fp32"):
        SamplerSettings(precision="fp16").check()


def test_bf16_samples_differ_from_fp32_but_stay_close_and_float32():
    model = tiny_dit()
    fp32, _ = run(model, SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=2.0))
    tf32, _ = run(model, SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=2.0, precision="tf32"))
    bf16, _ = run(model, SamplerSettings(sampler="ddim", num_steps=2, cfg_scale=2.0, precision="bf16"))
    assert bf16.dtype == torch.float32
    assert torch.equal(tf32, fp32)  # no TF32 on a CPU
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.02, rel


def test_sample_py_records_precision_and_the_resolved_clip(tmp_path, compose, monkeypatch):
    from dit.sampling.generate import generate_grid

    monkeypatch.chdir(tmp_path)  # the default output name goes to samples/ here
    model = tiny_dit(in_channels=3)
    ckpt = tmp_path / "pix.pt"
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "format_version": 1}, ckpt)
    common = [f"checkpoint={ckpt}", "device=cpu", "grid.labels=[0,1]", "sampler=ddim", "sampler.num_steps=2"]
    auto = generate_grid(compose("sample", [*common, f"grid.out={tmp_path / 'a.png'}"]))
    off = generate_grid(compose("sample", [*common, "sampler.clip_denoised=false", "sampler.precision=bf16"]))
    recorded = json.loads(settings_path_for(auto).read_text())
    assert recorded["clip_denoised"] is True and recorded["precision"] == "fp32"  # pixel: clipped by default
    recorded = json.loads(settings_path_for(off).read_text())
    assert recorded["clip_denoised"] is False and recorded["precision"] == "bf16"
    assert off.name.endswith("-g3-bf16-noclip-seed0.png")  # the name says what is not the default
