"""dit/flow against an independent derivation: Gaussian data, where everything is closed form.

Reference formulas, derived here and written without calling our helpers. Time runs from data
(t = 0) to noise (t = 1): x_t = a(t) x0 + g(t) eps, linear a = 1 - t, g = t; GVP a = cos(pi t / 2),
g = sin(pi t / 2). For x0 ~ N(mu, s^2 I) independent of eps ~ N(0, I), (x0, eps, x_t) are jointly
Gaussian per dimension with Var x_t = V = a^2 s^2 + g^2, Cov(x0, x_t) = a s^2, Cov(eps, x_t) = g, so
    E[x0 | x_t] = mu + a s^2 (x_t - a mu) / V,   E[eps | x_t] = g (x_t - a mu) / V,
and the optimal velocity (the minimiser of E|v(x_t, t) - (a' x0 + g' eps)|^2) is
    v*(x, t) = a' mu + (a a' s^2 + g g') (x - a mu) / V,   score = -(x - a mu) / V.
Its flow carries x_1 = z ~ N(0, I) to x_0 = mu + s z exactly (x_t = a mu + sqrt(V) z solves it), so
with moment-matched noise (sample mean 0, std 1 per dimension) the exact flow gives sample mean mu
and std s to rounding: a deterministic sampler's misses are its discretisation error alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dit.flow import (SIT_TIME, FlowMatching, NetworkTime, get_path, model_velocity, sample_logit_normal,
                      shift_time, time_grid)
from dit.sampling.flow import DIFFUSION_FORMS, SDEForm, diffusion_coefficient, sample_ode, sample_sde

F64 = torch.float64
MU = torch.tensor([1.5, -0.7], dtype=F64)  # data mean per dimension
S = 0.5  # data std


def coefficients(path: str, t: torch.Tensor):
    """(a, g, a', g') from the formulas in the module docstring."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = 0.5 * math.pi
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def optimal_velocity(path: str, mu: torch.Tensor = MU, s: float = S):
    def v(x, t):
        a, g, da, dg = coefficients(path, t[:, None])
        return da * mu + (a * da * s * s + g * dg) * (x - a * mu) / (a * a * s * s + g * g)
    return v


def optimal_noise(path: str, x, t):
    a, g, _, _ = coefficients(path, t[:, None])
    return g * (x - a * MU) / (a * a * S * S + g * g)


def matched_noise(n: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, len(MU), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (z - z.mean(0)) / z.std(0, unbiased=False)


def misses(x: torch.Tensor) -> tuple[float, float]:
    """max over dimensions of |sample mean - mu| and |sample std - s|."""
    return (float((x.mean(0) - MU).abs().max()), float((x.std(0, unbiased=False) - S).abs().max()))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_path_coefficients_match_formulas_and_their_derivatives_match_finite_differences(name):
    path = get_path(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    for mine, ref in zip((path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)), coefficients(name, t)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-15)
    h = 1e-5
    fd_alpha = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_sigma = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(path.d_alpha(t), fd_alpha, rtol=0, atol=1e-9)
    torch.testing.assert_close(path.d_sigma(t), fd_sigma, rtol=0, atol=1e-9)
    # the ends: data at t = 0, noise at t = 1
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    torch.testing.assert_close(path.alpha(ends), torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(path.sigma(ends), torch.tensor([0.0, 1.0], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_prediction_conversions_match_the_gaussian_posterior(name):
    path = get_path(name)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, len(MU), generator=gen, dtype=F64) * 2
    t = torch.rand(64, generator=gen, dtype=F64) * 0.98 + 0.01
    a, g, _, _ = coefficients(name, t[:, None])
    v = optimal_velocity(name)(x, t)
    eps = optimal_noise(name, x, t)
    score = -(x - a * MU) / (a * a * S * S + g * g)
    x0 = MU + a * S * S * (x - a * MU) / (a * a * S * S + g * g)
    torch.testing.assert_close(path.noise_from_velocity(v, x, t), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.score_from_velocity(v, x, t), score, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.data_from_velocity(v, x, t), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.velocity_from("noise", eps, x, t), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.velocity_from("score", score, x, t), v, rtol=1e-12, atol=1e-12)
    # a noise- or score-predicting network, seen through model_velocity, is the same field
    for prediction, out in (("noise", lambda x, t: optimal_noise(name, x, t)),
                            ("score", lambda x, t: path.score_from_velocity(optimal_velocity(name)(x, t), x, t))):
        torch.testing.assert_close(model_velocity(out, name, prediction)(x, t), v, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ time


def test_logit_normal_times_have_the_logit_normal_density():
    n, mean, std = 200_000, 0.4, 0.8
    t = sample_logit_normal(n, mean=mean, std=std, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert 0 < float(t.min()) and float(t.max()) < 1
    logit = torch.log(t / (1 - t))
    se = std / math.sqrt(n)  # standard error of the mean of logit(t)
    assert abs(float(logit.mean()) - mean) < 5 * se
    assert abs(float(logit.std()) - std) < 5 * std / math.sqrt(2 * n)
    # bin probabilities in t from the density N(logit t; mean, std) / (t (1 - t)), i.e. the normal
    # CDF at the logits of the bin edges; every bin within 5 standard errors of its count
    edges = np.linspace(0, 1, 21)
    cdf = stats.norm.cdf((np.log(edges[1:-1] / (1 - edges[1:-1])) - mean) / std)
    p = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    counts, _ = np.histogram(t.numpy(), bins=edges)
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_timestep_shift_moves_times_towards_noise_and_matches_lightningdits_convention():
    t = torch.linspace(0, 1, 101, dtype=F64)
    shifted = shift_time(t, 3.0)
    torch.testing.assert_close(shifted[[0, -1]], torch.tensor([0.0, 1.0], dtype=F64))  # the ends stay
    assert float(shift_time(torch.tensor(0.5, dtype=F64), 3.0)) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert bool((shifted[1:-1] > t[1:-1]).all()) and bool((shifted.diff() > 0).all())  # towards noise, monotone
    torch.testing.assert_close(shift_time(shifted, 1 / 3.0), t)  # shift 1/k undoes shift k
    torch.testing.assert_close(shift_time(t, 1.0), t)
    # LightningDiT shifts SiT's time u = 1 - t by k = 0.3; in ours that is shift 1 / 0.3 (> 1, towards noise)
    u = 1 - t
    lightning = 0.3 * u / (1 + (0.3 - 1) * u)
    torch.testing.assert_close(1 - lightning, shift_time(t, 1 / 0.3))
    grid = time_grid(4, shift=3.0)
    torch.testing.assert_close(grid, shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64), 3.0))
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_time(t, 0.0)


def test_network_time_scales_and_reverses_what_the_embedder_receives():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    torch.testing.assert_close(NetworkTime()(t), t)
    torch.testing.assert_close(NetworkTime(scale=1000.0)(t), 1000 * t)
    torch.testing.assert_close(SIT_TIME(t), 1 - t)
    assert NetworkTime.from_dict(NetworkTime(1000.0, True).to_dict()) == NetworkTime(1000.0, True)
    with pytest.raises(ValueError, match="scale must be > 0"):
        NetworkTime(scale=0)
    with pytest.raises(ValueError, match="unknown NetworkTime fields"):
        NetworkTime.from_dict({"scale": 1, "direction": "up"})


# ------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("name,timesteps,network_time", [
    ("linear", "uniform", NetworkTime()), ("gvp", "logit_normal", NetworkTime(scale=1000.0)),
    ("linear", "logit_normal", SIT_TIME)])
def test_the_optimal_field_is_the_minimum_of_the_flow_loss(name, timesteps, network_time):
    """d/de E[loss(v* + e delta)] at e = 0 is 2 E[(v* - u) delta] = 0, since E[u | x_t] = v*; for a
    field off the optimum by 0.1 delta it is 0.2 E[delta^2] > 0. Checked against the standard error
    of the per-sample gradient contributions."""
    n = 100_000
    flow = FlowMatching(name, timesteps=timesteps, network_time=network_time)
    gen = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(n, len(MU), generator=gen, dtype=F64)
    noise = torch.randn(n, len(MU), generator=gen, dtype=F64)
    t = flow.sample_t(n, generator=gen, dtype=F64)
    delta = lambda x, t: torch.sin(x) * (1 + t[:, None])  # noqa: E731  a perturbation direction

    def gradient(offset: float):
        e = torch.zeros((), dtype=F64, requires_grad=True)

        def net(x, t_net):  # a network in `network_time`'s convention
            tt = t_net / network_time.scale
            tt = 1 - tt if network_time.data_at_one else tt
            return network_time.velocity_sign * (optimal_velocity(name)(x, tt) + (offset + e) * delta(x, tt))

        per_sample = flow.training_losses(net, x0, t, noise=noise)["loss"]
        contributions = torch.autograd.grad(per_sample.sum(), e)[0]  # = sum of per-sample gradients
        # the per-sample gradients themselves, for the standard error
        e2 = torch.zeros(n, 1, dtype=F64, requires_grad=True)
        x_t = flow.path.interpolate(x0, noise, t)
        u = flow.path.velocity_target(x0, noise, t)
        v = optimal_velocity(name)(x_t, t) + (offset + e2) * delta(x_t, t)
        g_i = torch.autograd.grad(((v - u) ** 2).mean(1).sum(), e2)[0][:, 0]
        torch.testing.assert_close(contributions, g_i.sum(), rtol=1e-9, atol=1e-9)
        return float(g_i.mean()), float(g_i.std() / math.sqrt(n))

    grad, se = gradient(0.0)
    assert abs(grad) < 4 * se, (grad, se)
    wrong, wrong_se = gradient(0.1)
    x_t = flow.path.interpolate(x0, noise, t)
    expected = float((0.2 * delta(x_t, t) ** 2).mean(1).mean())  # 2 * 0.1 * E[delta^2]
    assert abs(wrong - expected) < 5 * wrong_se and wrong > 20 * wrong_se, (wrong, expected, wrong_se)


def test_loss_terms_match_direct_computation():
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 4, 3, 3, generator=gen, dtype=F64), torch.randn(8, 4, 3, 3, generator=gen, dtype=F64)
    t = torch.rand(8, generator=gen, dtype=F64)
    out = torch.randn(8, 8, 3, 3, generator=gen, dtype=F64)  # learned-sigma layout: first 4 channels are used
    flow = FlowMatching("linear", cosine_weight=0.5)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    terms = flow.losses_from_output(out, x0, x_t, t, noise)
    u = (noise - x0).numpy()
    p = out[:, :4].numpy()
    mse = ((p - u) ** 2).reshape(8, -1).mean(1)
    cos = (p * u).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(u, axis=1))  # along channels
    np.testing.assert_allclose(terms["mse"].numpy(), mse, rtol=1e-12)
    np.testing.assert_allclose(terms["cos"].numpy(), (1 - cos).reshape(8, -1).mean(1), rtol=1e-12)
    np.testing.assert_allclose(terms["loss"].numpy(), mse + 0.5 * (1 - cos).reshape(8, -1).mean(1), rtol=1e-12)
    # noise and score prediction (SiT's unweighted losses)
    np.testing.assert_allclose(FlowMatching(prediction="noise", t_min=1e-3, t_max=1 - 1e-3).losses_from_output(
        out, x0, x_t, t, noise)["loss"].numpy(), ((p - noise.numpy()) ** 2).reshape(8, -1).mean(1), rtol=1e-12)
    score_loss = ((t.numpy()[:, None, None, None] * p + noise.numpy()) ** 2).reshape(8, -1).mean(1)
    np.testing.assert_allclose(FlowMatching(prediction="score", t_min=1e-3, t_max=1 - 1e-3).losses_from_output(
        out, x0, x_t, t, noise)["loss"].numpy(), score_loss, rtol=1e-12)
    with pytest.raises(ValueError, match="returned 5 channels for an input of 4"):
        flow.losses_from_output(out[:, :5], x0, x_t, t, noise)
    with pytest.raises(ValueError, match="singular at the ends"):
        FlowMatching(prediction="noise")
    with pytest.raises(ValueError, match="unknown flow path 'vp'"):
        FlowMatching("vp")


# ------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("name", ["linear", "gvp"])
@pytest.mark.parametrize("method,num_steps,tol,nfe", [("heun", 50, 1e-3, 100), ("euler", 200, 1e-2, 200)])
def test_ode_sampler_maps_noise_to_the_gaussian_data(name, method, num_steps, tol, nfe):
    z = matched_noise(8192)  # moment-matched: the statistics of an affine flow are exact at any n
    out = sample_ode(optimal_velocity(name), z, num_steps=num_steps, method=method)
    assert out.nfe == nfe
    dmean, dstd = misses(out.x)
    assert dmean < tol / 2 and dstd < tol / 2, (dmean, dstd)  # met with a 2x margin
    # the same sampler driven the wrong way misses by far: flipped sign, or time read backwards
    for wrong in (lambda x, t: -optimal_velocity(name)(x, t), lambda x, t: optimal_velocity(name)(x, 1 - t)):
        bad = sample_ode(wrong, z, num_steps=num_steps, method=method).x
        assert max(misses(bad)) > 30 * tol


def test_network_with_sits_time_samples_correctly_only_through_network_time():
    """A SiT-convention network (receives u = 1 - t, returns dx/du = -v) samples right with
    SIT_TIME and wrong without it."""
    sit_net = lambda x, u: -optimal_velocity("linear")(x, 1 - u)  # noqa: E731
    z = matched_noise(4096)
    good = sample_ode(model_velocity(sit_net, "linear", "velocity", SIT_TIME), z, num_steps=20).x
    assert max(misses(good)) < 1e-3
    bad = sample_ode(model_velocity(sit_net, "linear"), z, num_steps=20).x
    assert max(misses(bad)) > 0.1


def test_adaptive_dopri5_reaches_the_data_and_counts_its_evaluations():
    z = matched_noise(4096)
    out = sample_ode(optimal_velocity("gvp"), z, num_steps=1, method="dopri5", rtol=1e-7, atol=1e-9)
    assert max(misses(out.x)) < 1e-4
    assert out.nfe > 6 and out.nfe % 6 == 2  # RK45: 6 evaluations per step (FSAL) + 2 at the start
    with pytest.raises(ValueError, match="adaptive dopri5 solver picks its own steps"):
        sample_ode(optimal_velocity("gvp"), z, num_steps=1, method="dopri5", shift=3.0)


@pytest.mark.parametrize("name,num_steps", [("linear", 100), ("gvp", 250)])
def test_sde_sampler_maps_noise_to_the_gaussian_data(name, num_steps):
    """SiT's default SDE (diffusion_form sigma, norm 1, last step 'mean' of 0.04; 250 grid points
    is SiT's default, 100 suffice on the linear path, whose mean is linear in t). The misses plus
    3 standard errors of the sample mean and std stay within 2e-2. (An exact moment recursion of
    this discretisation gives its bias: mean 0 / 0.0054 and std -0.0065 / -0.0076 for linear / GVP
    with mu = 1.5, s = 0.5, mostly from the noiseless last step over [0.04, 0].)"""
    n, tol = 30_000, 2e-2
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert 3 * se_mean < tol / 2 and 3 * se_std < tol / 2  # the sampling error is well below the tolerance
    z = torch.randn(n, len(MU), generator=torch.Generator().manual_seed(5), dtype=F64)
    out = sample_sde(optimal_velocity(name), z, path=name, num_steps=num_steps,
                     generator=torch.Generator().manual_seed(6))
    assert out.nfe == num_steps  # num_steps - 1 noisy steps and the last step
    dmean, dstd = misses(out.x)
    assert dmean + 3 * se_mean < tol and dstd + 3 * se_std < tol, (dmean, dstd)
    bad = sample_sde(lambda x, t: -optimal_velocity(name)(x, t), z[:4096], path=name, num_steps=100,
                     generator=torch.Generator().manual_seed(6)).x
    assert max(misses(bad)) > 0.5


def test_diffusion_forms_are_sits_written_in_our_time():
    """SiT's coefficients in its time u = 1 - t (alpha_u = u, sigma_u = 1 - u on the linear path),
    norm 0.7; each in our time must be the same number."""
    u = torch.linspace(0.05, 0.95, 19, dtype=F64)
    t = 1 - u
    k = 0.7
    sit = {"constant": torch.full_like(u, k), "sigma": k * (1 - u), "linear": k * (1 - u),
           "SBDM": k * ((1 / u) * (1 - u) ** 2 + (1 - u)),  # (alpha'/alpha) sigma^2 - sigma sigma', in u
           "decreasing": 0.25 * (k * torch.cos(math.pi * u) + 1) ** 2,
           "increasing-decreasing": k * torch.sin(math.pi * u) ** 2}
    assert set(sit) == set(DIFFUSION_FORMS)
    for form, ref in sit.items():
        torch.testing.assert_close(diffusion_coefficient(form, "linear", t, k), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="SBDM diffusion coefficient is infinite at t = 1"):
        sample_sde(optimal_velocity("linear"), matched_noise(8), path="linear", num_steps=10,
                   form=SDEForm(diffusion_form="SBDM"))


@pytest.mark.parametrize("form,last_step", [("SBDM", "tweedie"), ("constant", None), ("decreasing", "euler")])
def test_other_diffusion_forms_and_last_steps_reach_the_data(form, last_step):
    z = torch.randn(20_000, len(MU), generator=torch.Generator().manual_seed(8), dtype=F64)
    out = sample_sde(optimal_velocity("linear"), z, path="linear", num_steps=100,
                     form=SDEForm(diffusion_form=form, last_step=last_step), t_max=0.999 if form == "SBDM" else 1.0,
                     generator=torch.Generator().manual_seed(9))
    assert out.nfe == (99 if last_step is None else 100)
    dmean, dstd = misses(out.x)
    se = S / math.sqrt(len(z))
    assert dmean + 3 * se < 2e-2 and dstd + 3 * se < 2e-2, (dmean, dstd)


def test_sde_noise_is_per_sample_with_per_sample_generators():
    """Row i depends on its own generator only: the same rows in a batch of 4 and of 2 agree
    (what makes bulk files identical for any number of ranks)."""
    z = torch.randn(4, len(MU), generator=torch.Generator().manual_seed(10), dtype=F64)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    full = sample_sde(optimal_velocity("gvp"), z, path="gvp", num_steps=20, generator=gens()).x
    part = sample_sde(optimal_velocity("gvp"), z[2:], path="gvp", num_steps=20, generator=gens()[2:]).x
    torch.testing.assert_close(part, full[2:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="got 3 per-sample generators for a batch of 4"):
        sample_sde(optimal_velocity("gvp"), z, path="gvp", num_steps=20, generator=gens()[:3])
