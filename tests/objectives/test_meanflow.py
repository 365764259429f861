"""dit/flow/meanflow.py against independent derivations (issue 24).

Gaussian data, closed form. Per dimension x0 ~ N(mu, s^2), eps ~ N(0, 1), z_t = (1 - t) x0 + t eps
(t = 0 data, t = 1 noise; MeanFlow's convention and ours). The marginal of z_t is N(m(t), sd(t)^2)
with m(t) = (1 - t) mu, sd(t)^2 = (1 - t)^2 s^2 + t^2, and the optimal (marginal) velocity is
    v*(z, t) = E[eps - x0 | z_t = z] = m'(t) + sd'(t) / sd(t) (z - m(t))
(affine; its slope is Cov(eps - x0, z_t) / Var z_t = (t - (1 - t) s^2) / sd^2 = sd sd' / sd^2).
Along dz/dt = v* the standardised position (z - m(t)) / sd(t) stays constant, so the flow map from
time t to time r is Phi_{t->r}(z) = m(r) + sd(r) / sd(t) (z - m(t)), and the average velocity over
[r, t] (the displacement z_t - z_r over t - r) is
    u*(z, r, t) = (z - Phi_{t->r}(z)) / (t - r)    (r < t),    u*(z, t, t) = v*(z, t).
One MeanFlow step from t = 1, z_0 = z_1 - u*(z_1, 0, 1) = Phi_{1->0}(z_1) = mu + s z_1: the data
exactly. MeanFlow's identity u = v - (t - r) du/dt (du/dt = v . d_z u + d_t u) holds for u*, and
the training target built on the conditional velocity eps - x0 has conditional mean u* (du/dt is
linear in the tangent, and E[eps - x0 | z_t] = v*): the stop-gradient loss is stationary at u*.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

import dit.models.dit as dit_module
from dit.flow.meanflow import MeanFlow, MeanFlowOptions
from dit.flow.timesteps import NetworkTime

from conftest import tiny_dit

F64 = torch.float64
MU = torch.tensor([1.5, -0.7, 0.3], dtype=F64)  # data mean per dimension
S = torch.tensor([0.5, 1.3, 0.2], dtype=F64)  # data std per dimension (diagonal covariance)
NO_GUIDANCE = MeanFlowOptions(omega=1.0, kappa=0.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def m(t):
    return (1 - t)[:, None] * MU


def sd(t):
    return torch.sqrt((1 - t)[:, None] ** 2 * S ** 2 + t[:, None] ** 2)


def v_star(z, t):
    s2 = sd(t) ** 2
    return -MU + (t[:, None] - (1 - t)[:, None] * S ** 2) / s2 * (z - m(t))


def flow_map(z, t, r):
    """Phi_{t->r}: z at time t -> z at time r along the exact flow."""
    return m(r) + sd(r) / sd(t) * (z - m(t))


def u_star(z, r, t):
    d = t - r
    safe = torch.where(d > 0, d, torch.ones_like(d))[:, None]
    return torch.where((d > 0)[:, None], (z - flow_map(z, t, r)) / safe, v_star(z, t))


class Field:
    """A 'network' net(x, t_net (B, 2), y) returning u*(x, r, t) (+ e * delta), in `network_time`'s
    units; `config.num_classes` as a DiT's."""

    def __init__(self, network_time=NetworkTime(), delta=None, e=0.0, num_classes=3):
        self.network_time, self.delta, self.e = network_time, delta, e
        self.config = SimpleNamespace(num_classes=num_classes)

    def __call__(self, x, tr, y):
        t, r = tr[:, 0] / self.network_time.scale, tr[:, 1] / self.network_time.scale
        out = u_star(x, r, t)
        return out if self.delta is None else out + self.e * self.delta(x, r, t)


def gaussian_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, len(MU), generator=g, dtype=F64)
    return x0, torch.randn(n, len(MU), generator=g, dtype=F64)


# ------------------------------------------------------------------------------ the closed form


def test_the_closed_form_average_velocity_is_the_mean_of_v_star_over_the_interval():
    """u*(z_t, r, t) = 1 / (t - r) * integral_r^t v*(z_s, s) ds along the exact trajectory (Simpson,
    2000 intervals), and one step of it from t = 1 lands on mu + s z exactly."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, len(MU), generator=g, dtype=F64) * 1.5
    t, r = torch.tensor([1.0, 0.8, 0.6, 0.9, 0.3], dtype=F64), torch.tensor([0.0, 0.5, 0.1, 0.9, 0.0], dtype=F64)
    z_t = flow_map(z1, torch.ones(5, dtype=F64), t)
    k = 2000
    s = r[:, None] + (t - r)[:, None] * torch.linspace(0, 1, k + 1, dtype=F64)  # (5, k + 1)
    w = torch.ones(k + 1, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    values = torch.stack([v_star(flow_map(z_t, t, s[:, j]), s[:, j]) for j in range(k + 1)], dim=-1)
    mean = (values * w).sum(-1) / (3 * k)
    integral_mean = torch.where((t > r)[:, None], mean, v_star(z_t, t))
    torch.testing.assert_close(u_star(z_t, r, t), integral_mean, rtol=0, atol=1e-10)
    one_step = z1 - u_star(z1, torch.zeros(5, dtype=F64), torch.ones(5, dtype=F64))
    torch.testing.assert_close(one_step, MU + S * z1, rtol=0, atol=1e-12)


def test_the_meanflow_identity_holds_for_the_exact_field_through_our_jvp():
    """u* = v* - (t - r) du*/dt with du/dt from MeanFlow.time_derivative along (v*, 0, 1): our JVP
    and MeanFlow's identity, on the closed form, to rounding; also with the network time x1000."""
    n = 64
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, len(MU), generator=g, dtype=F64) * 2
    a, b = torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r[:8] = t[:8]
    for network_time in (NetworkTime(), NetworkTime(scale=1000.0)):
        mf = MeanFlow(options=NO_GUIDANCE, network_time=network_time)
        field = Field(network_time)
        y = torch.zeros(n, dtype=torch.long)
        dudt = mf.time_derivative(field, z, t, r, y, v_star(z, t))
        torch.testing.assert_close(v_star(z, t) - (t - r)[:, None] * dudt, u_star(z, r, t), rtol=0, atol=1e-10)
        # a wrong tangent (the r-direction, or no z-direction) breaks it
        wrong = v_star(z, t) - (t - r)[:, None] * mf.time_derivative(field, z, t, r, y, torch.zeros_like(z))
        assert float((wrong - u_star(z, r, t)).abs().max()) > 1e-2


# ------------------------------------------------------------------------------ the JVP target


def _features_in_input_dtype(t, dim, max_period=10000.0):
    """DiT's sin-cos features computed in t's dtype (contract 1 computes them in float32, which would
    bound a float64 finite difference in t at ~1e-5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("options", [NO_GUIDANCE, MeanFlowOptions(omega=1.0, kappa=0.5),
                                     MeanFlowOptions(omega=2.0, kappa=0.0, guidance_interval=(0.3, 0.8))],
                         ids=["unguided", "omega1-kappa0.5", "omega2-interval"])
def test_the_jvp_target_equals_a_central_finite_difference(monkeypatch, options):
    """MeanFlow.target on a tiny two-time DiT (float64, every architecture option off and on) equals
    v~ - (t - r) [u(z + h v~, r, t + h) - u(z - h v~, r, t - h)] / 2h, h = 1e-5, to 1e-6 (v~ the
    guided velocity, itself checked against the hand formula in another test)."""
    monkeypatch.setattr(dit_module, "timestep_features", _features_in_input_dtype)
    g = torch.Generator().manual_seed(2)
    n = 6
    x0, noise = torch.randn(n, 4, 8, 8, generator=g, dtype=F64), torch.randn(n, 4, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0.9, 0.6, 0.75, 0.4, 0.5, 1.0], dtype=F64)
    r = torch.tensor([0.1, 0.6, 0.2, 0.05, 0.45, 0.0], dtype=F64)
    y = torch.tensor([0, 1, 5, 2, 3, 4])  # 5: the null class (a dropped label)
    worst = 0.0
    for arch in ({}, dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True, modulation="scale_gate")):
        model = tiny_dit(time_inputs=2, **arch).double()
        mf = MeanFlow(options=options)
        target = mf.target(model, x0, t, r, y, noise)
        z = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        v_tilde = mf.target_velocity(model, z, t, noise - x0, y)
        h = 1e-5

        def u(z_, t_):
            with torch.no_grad():
                return model(z_, torch.stack([t_, r], 1), y)[:, :4]

        fd = (u(z + h * v_tilde, t + h) - u(z - h * v_tilde, t - h)) / (2 * h)
        expected = v_tilde - (t - r)[:, None, None, None] * fd
        err = float((target - expected).abs().max() / expected.abs().max())
        worst = max(worst, err)
        assert err < 1e-6, (arch, err)
        assert float((target - v_tilde).abs().max()) > 1e-3  # the derivative term is not negligible here
    print(f"JVP target vs central finite difference ({options}): max relative error {worst:.2e}")


def test_the_jvp_runs_in_float32_with_autocast_off_and_on_the_inner_module():
    """Under bf16 autocast (a training step's) the JVP is taken in float32: it equals the one taken
    without autocast; a DDP-like wrapper's own forward is not called by it."""
    model = tiny_dit(time_inputs=2)

    class Wrapper(torch.nn.Module):  # `module` as DDP has it
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args):
            self.calls += 1
            return self.module(*args)

    wrapped = Wrapper(model)
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, r, y = torch.tensor([0.9, 0.5, 0.7, 0.3]), torch.tensor([0.1, 0.5, 0.2, 0.0]), torch.tensor([0, 1, 2, 3])
    mf = MeanFlow(options=NO_GUIDANCE)
    plain = mf.time_derivative(wrapped, z, t, r, y, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = mf.time_derivative(wrapped, z, t, r, y, v)
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    assert wrapped.calls == 0
    losses = mf.training_losses(wrapped, torch.randn(4, 4, 8, 8), torch.stack([t, r], 1), {"y": y})
    assert wrapped.calls == 1  # the gradient-carrying forward goes through the wrapper, once


# ------------------------------------------------------------------------------ guidance folded in


def test_the_guided_velocity_is_the_papers_formula_on_kept_labels_inside_the_interval():
    """v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null) (official
    meanflow.py:178-185), v itself on dropped labels (null class) and outside the t-interval."""
    num_classes = 3

    class Labelled(Field):  # u depends on the label: u* + 0.3 (y + 1) (class 3 = null)
        def __call__(self, x, tr, y):
            self.seen = getattr(self, "seen", []) + [tr.clone()]
            return super().__call__(x, tr, y) + 0.3 * (y[:, None] + 1).to(x.dtype)

    g = torch.Generator().manual_seed(4)
    n = 8
    z, v = torch.randn(n, len(MU), generator=g, dtype=F64), torch.randn(n, len(MU), generator=g, dtype=F64)
    t = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.35, 0.8, 0.1, 0.6], dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 0, 3, 1, 2])
    for omega, kappa, interval in ((1.0, 0.5, (0.0, 1.0)), (2.0, 0.0, (0.3, 0.8)), (0.2, 0.92, (0.0, 0.75))):
        mf = MeanFlow(options=MeanFlowOptions(omega=omega, kappa=kappa, guidance_interval=interval))
        field = Labelled(num_classes=num_classes)
        got = mf.target_velocity(field, z, t, v, y)
        u_c = u_star(z, t, t) + 0.3 * (y[:, None] + 1).to(F64)
        u_u = u_star(z, t, t) + 0.3 * (num_classes + 1)
        expected = v.clone()
        for i in range(n):
            if y[i] != num_classes and interval[0] <= t[i] <= interval[1]:
                expected[i] = omega * v[i] + kappa * u_c[i] + (1 - omega - kappa) * u_u[i]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        assert all(torch.equal(tr[:, 0], tr[:, 1]) for tr in field.seen)  # guidance passes at h = 0 (r = t)
    assert MeanFlowOptions(omega=1.0, kappa=0.5).effective_scale == 2.0
    unguided = MeanFlow(options=NO_GUIDANCE)
    assert unguided.target_velocity(Field(), z, t, v, y) is v  # no extra pass without guidance


# ------------------------------------------------------------------------------ the loss


def test_the_adaptive_loss_is_the_official_weighting_of_the_summed_squared_error():
    """loss = L / sg((L + c)^p), L = ||u - u_tgt||^2 summed over C, H, W (official meanflow.py:238-243);
    its gradient is 2 (u - u_tgt) / (L + c)^p (the weight is stop-gradient); mse is the mean."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(5, 4, 3, 3, generator=g, dtype=F64, requires_grad=True)
    tgt = torch.randn(5, 4, 3, 3, generator=g, dtype=F64) * 0.1 + u.detach() * 0.99
    for p, c in ((1.0, 0.01), (0.5, 1e-3), (0.0, 0.01)):
        mf = MeanFlow(options=MeanFlowOptions(norm_p=p, norm_eps=c))
        terms = mf.losses_from_output(u, tgt)
        L = ((u.detach() - tgt) ** 2).reshape(5, -1).sum(1)
        torch.testing.assert_close(terms["loss"].detach(), L / (L + c) ** p, rtol=1e-12, atol=0)
        torch.testing.assert_close(terms["mse"].detach(), L / 36, rtol=1e-12, atol=0)
        (grad,) = torch.autograd.grad(terms["loss"].sum(), u)
        torch.testing.assert_close(grad, 2 * (u.detach() - tgt) / ((L + c) ** p)[:, None, None, None],
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("options", [MeanFlowOptions(omega=1.0, kappa=0.0, norm_p=0.0),
                                     MeanFlowOptions(omega=1.0, kappa=0.0)], ids=["plain-L2", "adaptive-p1"])
def test_the_exact_average_velocity_is_the_minimum_of_the_meanflow_loss(options):
    """At the exact field the stop-gradient loss's derivative along any direction delta is zero
    (within 4 standard errors of the per-sample contributions): E[u_tgt | z, r, t] = u* (module
    docstring; with the adaptive weight too, since u_tgt - u* is symmetric about 0 for Gaussian
    data). With the target and the weight held at u*'s (as the stop-gradients hold them) the loss
    rises by e^2 E[w delta^2] for e = +-0.1: a minimum. Off the optimum by 0.1 delta the derivative is
    far from zero."""
    n = 50_000
    mf = MeanFlow("logit_normal", options=options)
    x0, noise = gaussian_batch(n, seed=6)
    tr = mf.sample_t(n, generator=torch.Generator().manual_seed(7), dtype=F64)
    t, r = tr[:, 0], tr[:, 1]
    y = torch.zeros(n, dtype=torch.long)
    directions = {
        "sin": lambda x, r, t: torch.sin(x) * (1 + t[:, None]),
        "affine-in-r": lambda x, r, t: 0.5 * x * (1 + r[:, None]) - 0.2,
        "gap": lambda x, r, t: (t - r)[:, None] * torch.cos(2 * x),
    }
    for name, delta in directions.items():
        def per_sample_gradients(offset: float):
            e = torch.full((n, 1), offset, dtype=F64, requires_grad=True)  # one coefficient per sample
            field = Field(delta=delta, e=e)
            losses = mf.training_losses(field, x0, tr, {"y": y}, noise=noise)["loss"]
            (g_i,) = torch.autograd.grad(losses.sum(), e)
            return g_i[:, 0]

        g0 = per_sample_gradients(0.0)
        mean, se = float(g0.mean()), float(g0.std() / math.sqrt(n))
        assert abs(mean) < 4 * se, (name, mean, se)
        g1 = per_sample_gradients(0.1)
        assert abs(float(g1.mean())) > 5 * float(g1.std() / math.sqrt(n)), name
        # the loss with the exact field's target and weight held fixed (what the stop-gradients
        # hold), at u* + e delta
        target = mf.target(Field(), x0, t, r, y, noise)
        z = (1 - t)[:, None] * x0 + t[:, None] * noise
        base = u_star(z, r, t)
        l0 = ((base - target) ** 2).sum(1)
        weight = (l0 + options.norm_eps) ** -options.norm_p
        torch.testing.assert_close(weight * l0, mf.losses_from_output(base, target)["loss"], rtol=1e-12, atol=0)
        loss = {e: float((weight * ((base + e * delta(z, r, t) - target) ** 2).sum(1)).mean())
                for e in (-0.1, 0.0, 0.1)}
        assert loss[-0.1] > loss[0.0] and loss[0.1] > loss[0.0], (name, loss)


# ------------------------------------------------------------------------------ (t, r) sampling


def test_time_pairs_follow_the_papers_sampler():
    """t = max and r = min of two logit-normal(-0.4, 1) draws (official meanflow.py:147-150), r = t on
    exactly round(0.75 n) rows: t's marginal is F(x)^2 and r's (where r < t) is 1 - (1 - F(x))^2, F
    the logit-normal CDF; each bin within 5 standard errors. The draw is a function of the generator."""
    n = 100_000
    mf = MeanFlow()
    tr = mf.sample_t(n, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert tr.shape == (n, 2)
    t, r = tr[:, 0], tr[:, 1]
    assert bool((r <= t).all()) and 0 < float(r.min()) and float(t.max()) < 1
    equal = r == t
    assert int(equal.sum()) == round(0.75 * n)
    edges = np.linspace(0, 1, 21)
    inner = edges[1:-1]
    F = np.concatenate([[0.0], stats.norm.cdf((np.log(inner / (1 - inner)) + 0.4) / 1.0), [1.0]])
    for values, cdf in ((t.numpy(), F ** 2), (r[~equal].numpy(), 1 - (1 - F) ** 2)):
        p = np.diff(cdf)
        counts, _ = np.histogram(values, bins=edges)
        m_ = len(values)
        assert np.all(np.abs(counts / m_ - p) < 5 * np.sqrt(p * (1 - p) / m_) + 1e-12)
    again = mf.sample_t(n, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert torch.equal(again, tr)
    # the rows with r = t are spread over the batch (not the first 75 % as in the official code)
    small = mf.sample_t(8, generator=torch.Generator().manual_seed(9))
    assert int((small[:, 0] == small[:, 1]).sum()) == 6
    uniform = MeanFlow("uniform", options=MeanFlowOptions(fraction_r_equals_t=0.0)).sample_t(
        n, generator=torch.Generator().manual_seed(10), dtype=F64)
    assert int((uniform[:, 0] == uniform[:, 1]).sum()) == 0
    assert abs(float(uniform[:, 0].mean()) - 2 / 3) < 0.01 and abs(float(uniform[:, 1].mean()) - 1 / 3) < 0.01


def test_bad_options_are_refused():
    for bad, match in ((dict(fraction_r_equals_t=1.5), "fraction_r_equals_t"), (dict(kappa=1.0), "kappa"),
                       (dict(omega=-1.0), "omega"), (dict(norm_eps=0.0), "norm_eps"),
                       (dict(guidance_interval=(0.8, 0.2)), "guidance_interval")):
        with pytest.raises(ValueError, match=match):
            MeanFlowOptions(**bad)
    with pytest.raises(ValueError, match="data_at_one"):
        MeanFlow(network_time=NetworkTime(data_at_one=True))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        MeanFlow().training_losses(Field(), torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), {"y": None})
