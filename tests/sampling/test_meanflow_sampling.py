"""Sampling MeanFlow models (issue 24): the meanflow sampler behind the one sampler interface,
driven by the closed-form Gaussian average velocity (one step lands on the data's mean and
covariance), `auto` and the samplers that fit a MeanFlow model (meanflow and the flow ODE / SDE on
its instantaneous velocity u(z, t, t)), guidance on the average velocity, and sample.py on a
checkpoint of `train.py objective=meanflow` at 1 and 2 steps and with Heun, against a loop
written here.

The closed form (derived in tests/objectives/test_meanflow.py): per dimension x0 ~ N(mu, s^2),
z_t = (1 - t) x0 + t eps has marginal N(m(t), sd(t)^2), m = (1 - t) mu, sd^2 = (1 - t)^2 s^2 + t^2;
the flow map is Phi_{t->r}(z) = m(r) + sd(r) / sd(t) (z - m(t)) and the average velocity
u*(z, r, t) = (z - Phi_{t->r}(z)) / (t - r), u*(z, t, t) = v*(z, t).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dit.flow import MeanFlow, MeanFlowOptions, NetworkTime
from dit.io.images import to_uint8
from dit.sampling.guidance import GuidedDenoiser
from dit.sampling.images import sample_latents
from dit.sampling.loading import default_output_name, load_for_sampling, settings_path_for
from dit.sampling.meanflow import MeanFlowSampler, sample_meanflow
from dit.sampling.order import initial_noise, sample_generators, sample_labels
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import SamplerMismatchError, SamplerSettings
from dit.sampling.trained import trained_objective
from dit.flow import FlowMatching
from dit.config import ConfigError

from conftest import TOY_RUN, compose_config, single_thread, tiny_dit, train_config

F64 = torch.float64
MU = torch.tensor([1.5, -0.7, 0.3, 2.0], dtype=F64)
S = torch.tensor([0.5, 1.3, 0.2, 0.05], dtype=F64)


def m(t):
    return (1 - t)[:, None] * MU


def sd(t):
    return torch.sqrt((1 - t)[:, None] ** 2 * S ** 2 + t[:, None] ** 2)


def v_star(z, t):
    return -MU + (t[:, None] - (1 - t)[:, None] * S ** 2) / sd(t) ** 2 * (z - m(t))


def u_star(z, r, t):
    d = t - r
    safe = torch.where(d > 0, d, torch.ones_like(d))[:, None]
    jump = m(r) + sd(r) / sd(t) * (z - m(t))
    return torch.where((d > 0)[:, None], (z - jump) / safe, v_star(z, t))


def exact_denoiser(network_time=NetworkTime()):
    """denoiser(x, t_net (B, 2)) -> u*: the exact average velocity as the samplers see a network."""
    def denoiser(x, t_net):
        t, r = network_time.flow_time(t_net[:, 0]), network_time.flow_time(t_net[:, 1])
        return u_star(x, r, t)
    return denoiser


def matched_noise(n: int, seed: int = 0) -> torch.Tensor:
    """N(0, I) noise whitened to sample mean 0 and sample covariance I exactly: an affine map's
    moment error is then its own error alone, not the sampling noise."""
    z = torch.randn(n, len(MU), generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def moment_errors(x: torch.Tensor) -> tuple[float, float]:
    """(max |mean - mu|, max |covariance - diag(s^2)|) of samples x (n, D)."""
    cov = torch.cov(x.T, correction=0)
    return float((x.mean(0) - MU).abs().max()), float((cov - torch.diag(S ** 2)).abs().max())


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------------------ the equations


@pytest.mark.parametrize("num_steps", [1, 2, 4])
@pytest.mark.parametrize("network_time", [NetworkTime(), NetworkTime(scale=1000.0)], ids=["t", "1000t"])
def test_the_meanflow_sampler_maps_noise_to_the_gaussian_data_in_one_step(num_steps, network_time):
    """Driven by u*, the meanflow sampler (built by build_sampler, as sample.py builds it) lands on
    the data's mean and covariance to 1e-4 in 1, 2 or 4 evaluations; the Euler ODE on the same
    model's instantaneous velocity u(z, t, t) misses by far at 1 step and converges with Heun."""
    z = matched_noise(8192)
    mf = MeanFlow(options=MeanFlowOptions(omega=1.0, kappa=0.0), network_time=network_time)
    sampler = build_sampler(SamplerSettings(sampler="meanflow", num_steps=num_steps, cfg_scale=1), mf)
    assert isinstance(sampler, MeanFlowSampler)
    x, nfe = sampler.sample(exact_denoiser(network_time), z)
    mean_err, cov_err = moment_errors(x)
    print(f"meanflow {num_steps} step(s), network time x{network_time.scale:g}: mean error {mean_err:.1e}, "
          f"covariance error {cov_err:.1e}")
    assert nfe == num_steps and mean_err < 1e-4 and cov_err < 1e-4
    if num_steps == 1:
        euler, _ = build_sampler(SamplerSettings(sampler="euler", num_steps=1, cfg_scale=1), mf).sample(
            exact_denoiser(network_time), z)
        assert max(moment_errors(euler)) > 0.3  # one flow-matching step from noise: far from the data
        heun, heun_nfe = build_sampler(SamplerSettings(sampler="heun", num_steps=50, cfg_scale=1), mf).sample(
            exact_denoiser(network_time), z)
        assert heun_nfe == 100 and max(moment_errors(heun)) < 1e-3  # the ODE on u(z, t, t) = v*


def test_steps_are_jumps_on_the_grid_one_minus_i_over_n():
    seen = []

    def u(x, r, t):
        seen.append((float(t[0]), float(r[0])))
        return torch.ones_like(x)

    x, nfe = sample_meanflow(u, torch.zeros(2, 3), num_steps=4)
    assert seen == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)] and nfe == 4
    assert torch.equal(x, -torch.ones(2, 3))  # z_0 = z_1 - sum (t - r) u
    seen.clear()
    sample_meanflow(u, torch.zeros(2, 3), num_steps=2, shift=3.0)
    assert seen == [(1.0, 0.75), (0.75, 0.0)]  # the shifted grid: 3 * 0.5 / (1 + 2 * 0.5)


# ------------------------------------------------------------------------------ which samplers fit


def test_auto_is_one_meanflow_step_and_the_flow_samplers_fit_a_meanflow_model():
    mf = MeanFlow()
    auto = build_sampler(SamplerSettings(cfg_scale=1), mf).settings
    assert (auto.sampler, auto.num_steps, auto.nfe) == ("meanflow", 1, 1)
    two = build_sampler(SamplerSettings(num_steps=2, cfg_scale=1), mf).settings
    assert (two.sampler, two.num_steps) == ("meanflow", 2)  # a count other than the schema's 250 is kept
    for name in ("euler", "heun", "sde", "dopri5"):
        assert build_sampler(SamplerSettings(sampler=name, num_steps=3, cfg_scale=1), mf).settings.sampler == name
    with pytest.raises(SamplerMismatchError, match=r"'ddim'.*objective=meanflow.*use sampler=meanflow\|euler\|heun"):
        build_sampler(SamplerSettings(sampler="ddim"), mf)
    with pytest.raises(SamplerMismatchError, match=r"'meanflow'.*objective=flow.*needs a model trained with "
                                                   r"objective=meanflow.*use sampler=euler\|heun\|sde\|dopri5"):
        build_sampler(SamplerSettings(sampler="meanflow"), FlowMatching())
    record = SamplerSettings(sampler="meanflow", num_steps=2, cfg_scale=1).to_dict()
    assert (record["sampler"], record["num_steps"], record["nfe"], record["shift"]) == ("meanflow", 2, 2, 1.0)
    provenance = {"checkpoint": "/x/run/checkpoints/0000010.pt", "step": 10, "which": "ema"}
    assert "-meanflow2-cfg1-g3-seed0" in default_output_name(provenance, SamplerSettings(sampler="meanflow",
                                                                                         num_steps=2, cfg_scale=1), seed=0)


# ------------------------------------------------------------------------------ a network


def test_sample_latents_is_the_jump_loop_on_the_network_and_guidance_mixes_the_average_velocity(caplog):
    """sample_latents with sampler=meanflow (2 steps) equals z_0.5 = z_1 - 0.5 u(z_1, 0.5, 1),
    z_0 = z_0.5 - 0.5 u(z_0.5, 0, 0.5) on the network; with cfg_scale 3 on all channels
    u = u_null + 3 (u_cond - u_null) per jump, only inside a guidance interval (decided at the
    jump's start t), and a warning says the model's own guidance is trained in."""
    model = tiny_dit(time_inputs=2, learn_sigma=False)
    mf = MeanFlow()  # guidance folded in (omega 1, kappa 0.5): cfg_scale 1 is its protocol
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 2, 4])
    null = torch.full_like(labels, 5)

    def u(x, r, t, y):
        return model(x, torch.tensor([[t, r]] * len(x)), y)

    def jumps(mix):
        with torch.no_grad():
            z = noise
            for t, r in ((1.0, 0.5), (0.5, 0.0)):
                z = z - (t - r) * mix(z, r, t)
        return z

    plain = sample_latents(model, mf, labels, SamplerSettings(sampler="meanflow", num_steps=2, cfg_scale=1),
                           noise=noise)
    torch.testing.assert_close(plain, jumps(lambda z, r, t: u(z, r, t, labels)), rtol=1e-6, atol=1e-6)

    caplog.set_level(logging.WARNING, logger="dit.sampling.meanflow")
    guided = sample_latents(model, mf, labels, SamplerSettings(sampler="meanflow", num_steps=2, cfg_scale=3,
                                                               guided_channels="all"), noise=noise)

    def cfg(z, r, t):
        c, n = u(z, r, t, labels), u(z, r, t, null)
        return n + 3 * (c - n)

    torch.testing.assert_close(guided, jumps(cfg), rtol=1e-5, atol=1e-5)
    assert "trained with guidance" in caplog.text and "cfg_scale=1" in caplog.text
    caplog.clear()  # autoguidance's scale mixes with a guide model, not the null class: no warning
    auto = sample_latents(model, mf, labels, SamplerSettings(sampler="meanflow", num_steps=2, cfg_scale=3,
                                                             guided_channels="all", guidance="autoguidance"),
                          noise=noise, guide=model)
    torch.testing.assert_close(auto, plain, rtol=1e-5, atol=1e-5)  # guide = model: the unguided jumps
    assert "trained with guidance" not in caplog.text
    late = sample_latents(model, mf, labels, SamplerSettings(sampler="meanflow", num_steps=2, cfg_scale=3,
                                                             guided_channels="all", guidance_interval=[0.0, 0.6]),
                          noise=noise)
    torch.testing.assert_close(late, jumps(lambda z, r, t: cfg(z, r, t) if t <= 0.6 else u(z, r, t, labels)),
                               rtol=1e-5, atol=1e-5)
    denoiser = GuidedDenoiser(model, labels, SamplerSettings(sampler="meanflow", cfg_scale=3,
                                                             guidance_interval=[0.0, 0.6]), NetworkTime())
    assert denoiser.step_time(torch.tensor([[0.5, 0.0]])) == 0.5  # a jump's time is its start t


# ------------------------------------------------------------------------------ sample.py on a checkpoint

MEANFLOW_RUN = [*TOY_RUN, "objective=meanflow", "max_steps=4", "ckpt.every=4", "log.samples.every=2",
                "log.samples.num_images=4"]


@pytest.fixture(scope="module")
def meanflow_run(tmp_path_factory):
    """A 4-step `train.py objective=meanflow` run (its training grids ran the meanflow sampler)."""
    run = tmp_path_factory.mktemp("meanflow-run")
    from dit.train import run_training

    with single_thread():
        run_training(train_config(MEANFLOW_RUN), run)
    return run


def _hand_loop(ckpt, n, seed, num_steps):
    """The images of samples 0..n-1 by the jump loop written out, from the checkpoint's EMA model."""
    model, autoencoder, provenance = load_for_sampling(ckpt)
    model.eval()
    idx = list(range(n))
    gens = sample_generators(seed, idx)
    noise = initial_noise(gens, (model.config.in_channels, model.config.input_size, model.config.input_size))
    labels = sample_labels(seed, idx, model.config.num_classes, "uniform")
    grid = [1 - i / num_steps for i in range(num_steps + 1)]
    with torch.no_grad():
        z = noise
        for t, r in zip(grid[:-1], grid[1:]):
            out = model(z, torch.tensor([[t, r]] * n), labels)[:, :model.config.in_channels]
            z = z - (t - r) * out
        return to_uint8(autoencoder.decode(z))


def test_sample_py_on_a_meanflow_checkpoint_at_one_and_two_steps_and_with_heun(meanflow_run, tmp_path):
    from dit.sampling.generate import generate_bulk, generate_grid

    assert (meanflow_run / "samples" / "0000002.png").is_file()  # the training grid (one MeanFlow step)
    ckpt = meanflow_run / "checkpoints" / "0000004.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["model_config"]["time_inputs"] == 2 and state["config"]["objective"]["kind"] == "meanflow"
    assert any(k.startswith("h_embedder.") for k in state["ema"])
    objective = trained_objective(state["config"], learn_sigma=True)
    assert isinstance(objective, MeanFlow) and objective.options.kappa == 0.5

    common = [f"checkpoint={meanflow_run}", "device=cpu", "bulk.cfg_scale=1", "grid.cfg_scale=1", "seed=3"]
    grid = generate_grid(compose_config("sample", [*common, "grid.labels=[0,1]", f"grid.out={tmp_path / 'g.png'}"]))
    record = json.loads(settings_path_for(grid).read_text())
    assert (record["sampler"], record["num_steps"], record["nfe"]) == ("meanflow", 1, 1)  # auto
    assert record["objective"]["kind"] == "meanflow" and record["meanflow"]["omega"] == 1.0
    outputs = {}
    for extra in (["sampler=meanflow", "sampler.num_steps=1"], ["sampler=meanflow", "sampler.num_steps=2"],
                  ["sampler=heun", "sampler.num_steps=3"]):
        out = generate_bulk(compose_config("sample", [*common, *extra, "mode=bulk", "bulk.num_samples=5",
                                                      "bulk.batch_size=5", f"bulk.out={tmp_path / (extra[0][8:] + extra[1][-1] + '.npz')}"]))
        record = json.loads(settings_path_for(out).read_text())
        outputs[extra[1]] = np.load(out)["arr_0"]
        assert record["sampler"] == extra[0].split("=")[1] and record["objective"]["kind"] == "meanflow"
        assert record["nfe"] == {"sampler.num_steps=1": 1, "sampler.num_steps=2": 2, "sampler.num_steps=3": 6}[extra[1]]
    for steps in (1, 2):
        expected = np.asarray(_hand_loop(ckpt, 5, 3, steps))
        got = outputs[f"sampler.num_steps={steps}"]
        assert got.shape == expected.shape and np.array_equal(got, expected)
    assert not np.array_equal(outputs["sampler.num_steps=1"], outputs["sampler.num_steps=2"])
    with pytest.raises(ConfigError, match=r"unknown sampler 'ddpm'.*objective=meanflow"):
        generate_bulk(compose_config("sample", [*common, "sampler=ddpm", "mode=bulk", "bulk.num_samples=2",
                                                f"bulk.out={tmp_path / 'x.npz'}"]))
