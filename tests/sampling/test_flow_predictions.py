"""Noise- and score-prediction flow models sample (issue 22, item 6). Their output becomes a
velocity by dividing by alpha(t) (0 at t = 1, the noise end) or sigma(t) (0 at t = 0), so every
sampler started at t = 1 and every run ended in NonFiniteSamplesError. SiT samples them on
[eps, 1 - eps] with eps = 1e-3 (its `sample_eps` for those predictions on the linear path; in its
time, t = 1 data: `check_interval`'s t0 = eps, t1 = 1 - eps), the interval they train on; velocity
models keep all of [0, 1]."""

import json

import numpy as np
import pytest
import torch

from dit.flow import FlowMatching
from dit.flow.config import SINGULAR_END_EPS, flow_from_config
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import SamplerSettings

from conftest import compose_config, tiny_dit

MU, STD = 0.7, 0.3  # Gaussian data N(MU, STD^2) in every dimension
EPS = 1e-3  # SiT's sample_eps for noise and score models


def _posterior_mean(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for N(MU, STD^2) data on the linear path x_t = (1 - t) x0 + t eps."""
    a, s = 1 - t, t
    var = a**2 * STD**2 + s**2
    return MU + a * STD**2 / var * (x - a * MU)


def optimal_output(prediction: str):
    """The exact network of each prediction for that data: E[eps | x_t], or the score -E[eps | x_t] / t."""

    def net(x, t):
        x, tb = x.double(), t.double().reshape(-1, *([1] * (x.ndim - 1)))
        noise = (x - (1 - tb) * _posterior_mean(x, tb)) / tb
        return (noise if prediction == "noise" else -noise / tb).to(torch.float32 if x.dtype == torch.float32 else x.dtype)

    return net


def _noise(n: int = 4000, d: int = 4) -> torch.Tensor:
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)


@pytest.mark.parametrize("prediction", ["noise", "score"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "sde", "dopri5"])
def test_noise_and_score_models_sample_their_data_on_sits_interval(prediction, sampler):
    flow = flow_from_config({"kind": "flow", "path": "linear", "prediction": prediction})
    assert (flow.t_min, flow.t_max) == (SINGULAR_END_EPS, 1 - SINGULAR_END_EPS) == (EPS, 1 - EPS)
    times = []
    net = optimal_output(prediction)

    def recording(x, t):
        times.append(float(t[0]))
        return net(x, t)

    settings = SamplerSettings(sampler=sampler, num_steps=50 if sampler != "sde" else 250, cfg_scale=1.0)
    x, nfe = build_sampler(settings, flow).sample(recording, _noise(), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    assert max(times) == pytest.approx(1 - EPS, abs=1e-12)  # never at t = 1, where alpha = 0
    if sampler != "sde":  # the SDE ends at last_step_size (0.04), then its last step
        assert min(times) >= EPS - 1e-12
    if sampler in ("euler", "heun"):  # SiT's grid: evenly spaced from 1 - eps to eps
        grid = np.linspace(1 - EPS, EPS, 51)
        assert np.allclose(sorted(set(times), reverse=True), grid[:-1] if sampler == "euler" else grid, atol=1e-12)
    tol = {"euler": 2e-2, "sde": 2e-2}.get(sampler, 2e-3)  # first-order schemes: O(1/N) off
    assert abs(x.mean().item() - MU) < tol and abs(x.std(0).mean().item() - STD) < tol


def test_velocity_models_still_start_at_one():
    times = []

    def net(x, t):
        times.append(float(t[0]))
        return torch.zeros_like(x)

    build_sampler(SamplerSettings(sampler="euler", num_steps=4, cfg_scale=1.0), FlowMatching("linear")).sample(
        net, torch.zeros(2, 3))
    assert times == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_sample_py_draws_finite_images_from_a_noise_or_score_checkpoint(tmp_path, prediction):
    """Through sample.py on a tiny checkpoint recording the objective: before, NonFiniteSamplesError."""
    from dit.io.checkpoint import save_atomic
    from dit.sampling.generate import generate_bulk

    torch.manual_seed(0)
    model = tiny_dit(in_channels=3, num_classes=5, input_size=8)
    with torch.no_grad():  # the final layer starts at zero: give it an output to turn into a velocity
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    objective = {"kind": "flow", "path": "linear", "prediction": prediction, "time_sampling": "uniform"}
    ckpt = tmp_path / f"{prediction}.pt"
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 3, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "config": {"objective": objective}, "format_version": 1}, ckpt)
    for sampler in ("sde", "heun"):
        out = tmp_path / f"{sampler}.npz"
        generate_bulk(compose_config("sample", [f"checkpoint={ckpt}", "device=cpu", f"sampler={sampler}",
                                                "sampler.num_steps=6", "mode=bulk", "bulk.num_samples=4",
                                                f"bulk.out={out}"]))
        images = np.load(out)["arr_0"]
        assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
        assert json.loads(out.with_suffix(".json").read_text())["objective"]["prediction"] == prediction
