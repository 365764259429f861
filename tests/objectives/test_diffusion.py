"""dit/diffusion against an independent float64 derivation and against diffusers.

Every reference value in this file is computed here from the equations, in float64, without
calling our helpers:
  DDPM (Ho et al. 2020): beta_t linear 1e-4..0.02, alpha_bar_t = prod_{s<=t}(1 - beta_s),
    q(x_t|x_0) = N(sqrt(alpha_bar_t) x_0, 1 - alpha_bar_t),
    posterior q(x_{t-1}|x_t,x_0) = N(c1 x_0 + c2 x_t, beta_tilde_t) with
    c1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), c2 = sqrt(alpha_t)(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t),
    beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t);
  improved DDPM (Nichol & Dhariwal 2021): learned range log sigma^2 = f log beta + (1 - f) log beta_tilde,
    f = (v + 1) / 2; beta_tilde_0 = 0 has its log replaced by log beta_tilde_1; hybrid loss
    eps-MSE + VLB (bits/dim) with the mean detached, decoder NLL at t = 0;
  respacing: keep timesteps S, beta'_k = 1 - alpha_bar[S_k] / alpha_bar[S_{k-1}];
  DDIM (Song et al. 2021, eq. 12).
diffusers' DDPMScheduler / DDIMScheduler are a second, independent implementation.

Shapes are tiny: C = 2 latent channels, 4x4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dit.diffusion import create_diffusion, space_timesteps

T = 1000
C, H, W = 2, 4, 4
ATOL = RTOL = 1e-5  # float32 code vs float64 reference: |ours - ref| <= ATOL + RTOL * |ref|


# ============================================================================ float64 reference


def ref_betas() -> np.ndarray:
    return np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=np.float64)


def ref_alpha_bar() -> np.ndarray:
    out, prod = [], 1.0
    for beta in ref_betas():
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out, dtype=np.float64)


ALPHA_BAR = ref_alpha_bar()


class RefChain:
    """The chain that visits the original timesteps `kept` (ascending), in float64; index k."""

    def __init__(self, kept):
        self.kept = list(kept)
        self.ab = ALPHA_BAR[self.kept]
        self.ab_prev = np.concatenate([[1.0], self.ab[:-1]])
        self.beta = 1.0 - self.ab / self.ab_prev
        self.beta_tilde = self.beta * (1.0 - self.ab_prev) / (1.0 - self.ab)
        self.log_beta_tilde_clipped = np.log(np.concatenate([[self.beta_tilde[1]], self.beta_tilde[1:]]))

    @staticmethod
    def _at(arr, k) -> torch.Tensor:
        """arr[k] per sample, as a float64 (B, 1, 1, 1) tensor."""
        return torch.as_tensor(np.asarray(arr)[np.asarray(k)], dtype=torch.float64).view(-1, 1, 1, 1)

    def q_sample(self, x0, k, eps):
        ab = self._at(self.ab, k)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def posterior(self, x0, xt, k):
        ab, abp, beta = self._at(self.ab, k), self._at(self.ab_prev, k), self._at(self.beta, k)
        mean = abp.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - abp) / (1 - ab) * xt
        return mean, self._at(self.beta_tilde, k), self._at(self.log_beta_tilde_clipped, k)

    def p_learned_range(self, out, xt, k):
        """(mean, log_variance, pred_x0) of p(x_{k-1} | x_k) from a (B, 2C, H, W) eps + v output."""
        eps, v = out[:, :C], out[:, C:]
        ab = self._at(self.ab, k)
        x0 = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
        mean, _, _ = self.posterior(x0, xt, k)
        frac = (v + 1) / 2
        log_var = frac * self._at(np.log(self.beta), k) + (1 - frac) * self._at(self.log_beta_tilde_clipped, k)
        return mean, log_var, x0

    def ddim_step(self, eps, xt, k, eta=0.0, noise=None):
        ab, abp = self._at(self.ab, k), self._at(self.ab_prev, k)
        x0 = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
        sigma = eta * ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
        out = abp.sqrt() * x0 + (1 - abp - sigma**2).sqrt() * eps
        return out if noise is None else out + sigma * noise


def ref_rounded_linspace(start: int, size: int, count: int) -> list[int]:
    """`count` evenly spaced steps over [start, start + size), both ends included, rounded."""
    if count == 1:
        return [start]
    return [start + round(j * (size - 1) / (count - 1)) for j in range(count)]


def f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def assert_close(actual, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Elementwise |actual - expected| <= atol + rtol |expected|; prints the errors (pytest -s)."""
    actual, expected = f64(actual), f64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    max_abs = err.max().item()
    max_rel = (err.max() / expected.abs().max().clamp_min(1e-300)).item()
    bound = atol + rtol * expected.abs()
    print(f"[{what}] max abs err {max_abs:.2e}, max rel err (to max |ref|) {max_rel:.2e}, "
          f"worst err/tolerance {(err / bound).max().item():.2f}")
    bad = ~(err <= bound)  # NaN counts as off
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max abs err {max_abs:.3e}, rel {max_rel:.3e}"


# ============================================================================ test models


class FixedOutput(torch.nn.Module):
    """Returns a given output whatever the input; records the (x, t) it was called with."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return self.output


class ToyDenoiser(torch.nn.Module):
    """A deterministic stand-in for a trained network, stable over a whole sampling chain.

    eps: the exact posterior-mean noise for data x_0 ~ N(0, 0.25 I), plus a small fixed random
    conv term so the channels and pixels interact; v (variance channels): tanh of another conv
    plus a t-dependent shift, so the learned range is exercised across (-1, 1).
    Records every timestep it is called with.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(C, 2 * C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(0.1 * torch.randn(2 * C, generator=g))
        self.register_buffer("alpha_bar", torch.tensor(ALPHA_BAR, dtype=torch.float32))
        self.seen_t: list[int] = []

    def forward(self, x, t):
        assert (t == t[0]).all()
        self.seen_t.append(int(t[0]))
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        h = self.conv(x)
        eps = (1 - ab).sqrt() * x / (0.25 * ab + 1 - ab) + 0.1 * torch.tanh(h[:, :C])
        v = torch.tanh(h[:, C:] + (t.float() / 500 - 1).view(-1, 1, 1, 1))
        return torch.cat([eps, v], dim=1)


def diffusers_ddpm_250() -> DDPMScheduler:
    """DDPMScheduler configured to reproduce DiT's 250-step sampler (issue 2)."""
    sched = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        variance_type="learned_range", clip_sample=False, timestep_spacing="linspace",
    )
    sched.set_timesteps(250)
    return sched


def diffusers_ddim(num_steps: int) -> DDIMScheduler:
    """DDIMScheduler with our "ddimN" timesteps {0, T/N, ...} ("leading", offset 0) and our last
    step convention alpha_bar_prev = 1 at t = 0 (set_alpha_to_one)."""
    sched = DDIMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    )
    sched.set_timesteps(num_steps)
    return sched


def random_learned_output(batch: int, seed: int) -> torch.Tensor:
    """(B, 2C, H, W): eps ~ N(0, 1); variance values uniform in [-1, 1] with the ends hit exactly."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(batch, C, H, W, generator=g)
    v = torch.rand(batch, C, H, W, generator=g) * 2 - 1
    v[:, 0, 0, 0], v[:, 0, 0, 1] = -1.0, 1.0
    return torch.cat([eps, v], dim=1)


# ============================================================================ schedule


def test_linear_schedule_and_derived_constants_match_float64_formulas():
    d = create_diffusion("")
    ref = RefChain(range(T))
    assert d.num_timesteps == T and d.timestep_map.tolist() == list(range(T))
    np.testing.assert_allclose(d.betas, ref_betas(), rtol=1e-14, atol=0)
    assert d.betas[0] == pytest.approx(1e-4, rel=1e-14) and d.betas[-1] == pytest.approx(0.02, rel=1e-14)
    np.testing.assert_allclose(d.alphas_cumprod, ALPHA_BAR, rtol=1e-12, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod_prev, ref.ab_prev, rtol=1e-12, atol=0)
    np.testing.assert_allclose(d.posterior_variance, ref.beta_tilde, rtol=1e-10, atol=0)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, ref.log_beta_tilde_clipped, rtol=1e-12, atol=0)
    np.testing.assert_allclose(d.posterior_mean_coef1, np.sqrt(ref.ab_prev) * ref.beta / (1 - ref.ab), rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef2, np.sqrt(1 - ref.beta) * (1 - ref.ab_prev) / (1 - ref.ab), rtol=1e-10)
    # diffusers builds the same schedule (in float32): the basis of the comparisons below.
    diffusers_ab = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod
    assert_close(diffusers_ab, ALPHA_BAR, "diffusers alpha_bar vs float64", atol=0, rtol=1e-6)


def test_q_sample_matches_closed_form():
    d = create_diffusion("")
    t = torch.tensor([0, 1, 499, 999])
    x0, eps = torch.randn(4, C, H, W), torch.randn(4, C, H, W)
    assert_close(d.q_sample(x0, t, eps), RefChain(range(T)).q_sample(f64(x0), t.numpy(), f64(eps)), "q_sample")
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x0, t, eps[:, :1])


# ============================================================================ respacing


def test_respacing_250_keeps_rounded_linspace_of_999():
    kept = space_timesteps(T, "250")
    expected = [round(i * 999 / 249) for i in range(250)]
    assert kept == expected
    assert len(set(kept)) == 250 and kept[:3] == [0, 4, 8] and kept[-2:] == [995, 999]
    assert space_timesteps(T, 250) == expected and space_timesteps(T, [250]) == expected
    d = create_diffusion("250")
    assert d.num_timesteps == 250 and d.timestep_map.tolist() == expected


def test_respacing_ddim_takes_an_exact_integer_stride():
    assert space_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(T, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(T, "ddim1000") == list(range(1000))
    with pytest.raises(ValueError, match="300"):
        space_timesteps(T, "ddim300")  # stride 3 gives 334 steps, stride 4 gives 250


def test_respacing_sections_split_the_range_evenly():
    # "10,20": 10 steps spread over [0, 500), 20 over [500, 1000)
    assert space_timesteps(T, "10,20") == ref_rounded_linspace(0, 500, 10) + ref_rounded_linspace(500, 500, 20)
    # T % sections != 0: the first sections are one step longer (sizes 4, 3, 3 of 10)
    assert space_timesteps(10, "3,3,3") == sorted(
        set(ref_rounded_linspace(0, 4, 3) + ref_rounded_linspace(4, 3, 3) + ref_rounded_linspace(7, 3, 3))
    )
    with pytest.raises(ValueError, match="600"):
        space_timesteps(T, "10,600")  # a section of 500 timesteps cannot give 600


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,20"])
def test_respaced_chain_has_the_base_alpha_bar_at_kept_steps(spec):
    d = create_diffusion(spec)
    kept = space_timesteps(T, spec)
    np.testing.assert_allclose(d.alphas_cumprod, ALPHA_BAR[kept], rtol=1e-12, atol=0)
    prev = np.concatenate([[1.0], ALPHA_BAR[kept][:-1]])
    np.testing.assert_allclose(d.betas, 1 - ALPHA_BAR[kept] / prev, rtol=1e-10, atol=0)


def test_model_receives_the_original_timestep():
    out = torch.zeros(2, 2 * C, H, W)

    d250 = create_diffusion("250")
    kept = space_timesteps(T, "250")
    spy = FixedOutput(out)
    d250.p_sample_loop(spy, (2, C, H, W), noise=torch.randn(2, C, H, W))
    seen = [t.tolist() for _, t in spy.calls]
    assert seen == [[s, s] for s in reversed(kept)]
    assert seen[0] == [999, 999] and seen[-1] == [0, 0]

    spy = FixedOutput(out)
    create_diffusion("ddim50").ddim_sample_loop(spy, (2, C, H, W), noise=torch.randn(2, C, H, W))
    assert [t[0].item() for _, t in spy.calls] == list(range(980, -1, -20))

    # training losses and p_mean_variance take chain indices too
    spy = FixedOutput(torch.zeros(4, 2 * C, H, W))
    d250.training_losses(spy, torch.zeros(4, C, H, W), torch.tensor([0, 1, 125, 249]))
    assert spy.calls[-1][1].tolist() == [0, 4, kept[125], 999]
    d250.p_mean_variance(spy, torch.zeros(4, C, H, W), torch.tensor([249, 248, 2, 0]))
    assert spy.calls[-1][1].tolist() == [999, 995, 8, 0]


# ============================================================================ posterior, learned range


@pytest.mark.parametrize("spec", ["", "250"])
def test_posterior_mean_and_variance_match_float64(spec):
    d = create_diffusion(spec)
    ref = RefChain(d.timestep_map.tolist() if spec else range(T))
    k = torch.tensor([0, 1, 2, d.num_timesteps // 2, d.num_timesteps - 1])
    x0, xt = torch.randn(5, C, H, W), torch.randn(5, C, H, W)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, k)
    ref_mean, ref_var, ref_log_var = ref.posterior(f64(x0), f64(xt), k.numpy())
    assert_close(mean, ref_mean, f"posterior mean [{spec or 'T=1000'}]")
    assert_close(var.expand_as(ref_var), ref_var, f"posterior variance [{spec or 'T=1000'}]", atol=0)
    # clipped log-variance: finite at t = 0, equal to log beta_tilde_1 there
    assert torch.isfinite(log_var).all()
    assert_close(log_var.expand_as(ref_log_var), ref_log_var, f"clipped log variance [{spec or 'T=1000'}]")


@pytest.mark.parametrize("spec", ["", "250"])
def test_learned_range_p_mean_variance_matches_float64(spec):
    d = create_diffusion(spec)
    ref = RefChain(d.timestep_map.tolist() if spec else range(T))
    k = torch.tensor([0, 1, d.num_timesteps // 3, d.num_timesteps - 1])
    out, x = random_learned_output(4, seed=1), torch.randn(4, C, H, W)
    got = d.p_mean_variance(FixedOutput(out), x, k, clip_denoised=False)
    ref_mean, ref_log_var, ref_x0 = ref.p_learned_range(f64(out), f64(x), k.numpy())
    tag = spec or "T=1000"
    assert_close(got["pred_xstart"], ref_x0, f"pred_xstart [{tag}]")
    assert_close(got["mean"], ref_mean, f"p mean [{tag}]")
    assert_close(got["log_variance"], ref_log_var, f"learned-range log variance [{tag}]")
    assert_close(got["variance"], ref_log_var.exp(), f"learned-range variance [{tag}]", atol=0)
    # the ends of the range: v = -1 gives beta_tilde (clipped), v = +1 gives beta
    lo, hi = got["log_variance"][:, 0, 0, 0], got["log_variance"][:, 0, 0, 1]
    assert_close(lo, np.log(np.concatenate([[ref.beta_tilde[1]], ref.beta_tilde[1:]]))[k.numpy()], "v=-1 end")
    assert_close(hi, np.log(ref.beta)[k.numpy()], "v=+1 end")


def test_fixed_variances_without_learned_sigma():
    ref = RefChain(range(T))
    k = torch.tensor([0, 1, 500, 999])
    x, out = torch.randn(4, C, H, W), torch.randn(4, C, H, W)
    large = create_diffusion("", learn_sigma=False).p_mean_variance(FixedOutput(out), x, k, clip_denoised=False)
    small = create_diffusion("", learn_sigma=False, sigma_small=True).p_mean_variance(
        FixedOutput(out), x, k, clip_denoised=False
    )
    # fixed large: beta_t, with beta_tilde_1 at t = 0; fixed small: beta_tilde_t (clipped log)
    large_ref = np.concatenate([[ref.beta_tilde[1]], ref.beta[1:]])[k.numpy()]
    assert_close(large["variance"][:, 0, 0, 0], large_ref, "fixed-large variance", atol=0)
    assert_close(large["log_variance"][:, 0, 0, 0], np.log(large_ref), "fixed-large log variance")
    assert_close(small["variance"][:, 0, 0, 0], ref.beta_tilde[k.numpy()], "fixed-small variance", atol=0)
    assert_close(small["log_variance"][:, 0, 0, 0], ref.log_beta_tilde_clipped[k.numpy()], "fixed-small log var")
    ref_mean, _, _ = ref.p_learned_range(f64(torch.cat([out, out], 1)), f64(x), k.numpy())  # same mean
    assert_close(large["mean"], ref_mean, "fixed-variance mean")


# ============================================================================ training losses


def ref_approx_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def ref_hybrid_losses(out, x0, eps, k, ref: RefChain):
    """Per-sample (mse, vb) of DiT's objective in float64."""
    out, x0, eps = f64(out), f64(x0), f64(eps)
    xt = ref.q_sample(x0, k, eps)
    mse = ((eps - out[:, :C]) ** 2).mean(dim=(1, 2, 3))
    true_mean, _, true_log_var = ref.posterior(x0, xt, k)
    mean, log_var, _ = ref.p_learned_range(out, xt, k)  # gradient-free here: the mean is "detached"
    kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean) ** 2 * (-log_var).exp())
    kl_bits = kl.mean(dim=(1, 2, 3)) / math.log(2)
    # decoder: x0 on 256 levels in [-1, 1], bins of half-width 1/255, the outer bins open-ended
    std = (0.5 * log_var).exp()
    cdf_hi = ref_approx_normal_cdf((x0 + 1 / 255 - mean) / std)
    cdf_lo = ref_approx_normal_cdf((x0 - 1 / 255 - mean) / std)
    prob = torch.where(x0 < -0.999, cdf_hi, torch.where(x0 > 0.999, 1 - cdf_lo, cdf_hi - cdf_lo))
    nll_bits = -prob.log().mean(dim=(1, 2, 3)) / math.log(2)
    vb = torch.where(torch.as_tensor(k) == 0, nll_bits, kl_bits)
    return mse, vb, xt


def loss_inputs(seed: int = 0):
    """A batch with t = 0 twice, data on the 256-level grid including both edges, and a network
    output near the true noise (so the decoder likelihood is not vanishingly small)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.tensor([0, 0, 1, 10, 500, 999])
    x0 = torch.randint(0, 256, (6, C, H, W), generator=g).float() / 127.5 - 1
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    eps = torch.randn(6, C, H, W, generator=g)
    out = random_learned_output(6, seed=seed + 1)
    out[:, :C] = eps + 0.3 * torch.randn(6, C, H, W, generator=g)
    return k, x0, eps, out


def test_training_losses_match_an_independent_float64_computation():
    d = create_diffusion("")
    k, x0, eps, out = loss_inputs()
    spy = FixedOutput(out)
    losses = d.training_losses(spy, x0, k, noise=eps)
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (6,) for v in losses.values())
    ref_mse, ref_vb, ref_xt = ref_hybrid_losses(out, x0, eps, k.numpy(), RefChain(range(T)))
    assert_close(spy.calls[0][0], ref_xt, "x_t fed to the model")
    assert spy.calls[0][1].tolist() == k.tolist()
    assert_close(losses["mse"], ref_mse, "mse", atol=0, rtol=1e-6)  # few float32 ops: hold it tighter
    assert_close(losses["vb"][k == 0], ref_vb[k == 0], "vb at t=0 (decoder NLL, bits/dim)")
    assert_close(losses["vb"][k > 0], ref_vb[k > 0], "vb at t>0 (KL, bits/dim)")
    assert torch.equal(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_gradient_reaches_only_the_variance_channels():
    d = create_diffusion("")
    k, x0, eps, out = loss_inputs(seed=3)
    out = out.clone().requires_grad_(True)
    losses = d.training_losses(FixedOutput(out), x0, k, noise=eps)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.all(grad_vb[:, :C] == 0), "the VLB term must not train the mean"
    assert (grad_vb[:, C:] != 0).float().mean() > 0.9
    assert torch.all(grad_mse[:, C:] == 0)
    # d/d eps_hat of mean((eps - eps_hat)^2) = 2 (eps_hat - eps) / (C H W)
    assert_close(grad_mse[:, :C], 2 * (f64(out[:, :C].detach()) - f64(eps)) / (C * H * W), "mse gradient")
    # control: the full (non-detached) bound does move the mean, so the zeros above are the detach
    full = create_diffusion("", use_kl=True).training_losses(FixedOutput(out), x0, k, noise=eps)
    (grad_kl,) = torch.autograd.grad(full["loss"].sum(), out)
    assert grad_kl[:, :C].abs().max() > 0


def test_training_losses_without_learned_sigma_are_plain_mse():
    d = create_diffusion("", learn_sigma=False)
    k, x0, eps, out = loss_inputs()
    losses = d.training_losses(FixedOutput(out[:, :C]), x0, k, noise=eps)
    assert set(losses) == {"loss", "mse"}
    assert_close(losses["mse"], ((f64(eps) - f64(out[:, :C])) ** 2).mean(dim=(1, 2, 3)), "mse (fixed sigma)")
    assert torch.equal(losses["loss"], losses["mse"])
    with pytest.raises(ValueError, match="output channels"):
        create_diffusion("").training_losses(FixedOutput(out[:, :C]), x0, k, noise=eps)


# ============================================================================ DDPM vs diffusers


def test_ddpm_250_timesteps_equal_diffusers_linspace():
    assert diffusers_ddpm_250().timesteps.tolist() == list(reversed(space_timesteps(T, "250")))


@pytest.mark.parametrize("k", [249, 180, 60, 1, 0])
def test_one_ddpm_step_matches_float64_and_diffusers(k):
    d, sched = create_diffusion("250"), diffusers_ddpm_250()
    ref = RefChain(space_timesteps(T, "250"))
    timestep = ref.kept[k]
    out, x = random_learned_output(2, seed=k), torch.randn(2, C, H, W)
    t = torch.full((2,), k)
    seed = 1234 + k
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))

    ours = d.p_mean_variance(FixedOutput(out), x, t, clip_denoised=False)
    ours_sample = d.p_sample(FixedOutput(out), x, t, generator=torch.Generator().manual_seed(seed))["sample"]
    theirs_sample = sched.step(out, timestep, x, generator=torch.Generator().manual_seed(seed)).prev_sample

    ref_mean, ref_log_var, _ = ref.p_learned_range(f64(out), f64(x), np.full(2, k))
    ref_sample = ref_mean + (k > 0) * (0.5 * ref_log_var).exp() * f64(noise)
    assert_close(ours["mean"], ref_mean, f"DDPM step k={k}: our mean vs float64")
    assert_close(ours["log_variance"], ref_log_var, f"DDPM step k={k}: our log variance vs float64")
    assert_close(ours_sample, ref_sample, f"DDPM step k={k}: our sample vs float64")
    assert_close(theirs_sample, ref_sample, f"DDPM step k={k}: diffusers sample vs float64")
    assert_close(ours_sample, theirs_sample, f"DDPM step k={k}: ours vs diffusers sample")
    if k > 0:
        # diffusers' learned-range log variance (same split: eps = first C channels, v = the rest)
        theirs_log_var = sched._get_variance(timestep, predicted_variance=out[:, C:])
        # diffusers forms beta'_k = 1 - alpha_bar_t / alpha_bar_prev in float32: a cancellation
        # worth ~eps32 / beta'_k in the log (1.5e-4 at k=1, where beta'_k ~ 4e-4). Ours is float64.
        float32_cancellation = 4 * torch.finfo(torch.float32).eps / ref.beta[k]
        assert_close(theirs_log_var, ref_log_var, f"DDPM step k={k}: diffusers log variance vs float64",
                     atol=max(ATOL, float32_cancellation))
        theirs_mean = theirs_sample - (0.5 * theirs_log_var).exp() * noise
        assert_close(theirs_mean, ref_mean, f"DDPM step k={k}: diffusers mean vs float64")
    # (at k = 0 no noise is added by either; diffusers' log variance there is log(1e-20)-based,
    # ours the clipped log beta_tilde_1: a convention that never reaches a sample)


def test_ddpm_250_loop_matches_float64_and_diffusers():
    d, sched = create_diffusion("250"), diffusers_ddpm_250()
    ref = RefChain(space_timesteps(T, "250"))
    x_T = torch.randn(2, C, H, W)
    model = ToyDenoiser()
    ours = d.p_sample_loop(model, x_T.shape, noise=x_T, generator=torch.Generator().manual_seed(7))
    assert model.seen_t == list(reversed(ref.kept))

    g = torch.Generator().manual_seed(7)
    x = x_T.clone()
    with torch.no_grad():
        for timestep in sched.timesteps:
            x = sched.step(model(x, torch.full((2,), int(timestep))), timestep, x, generator=g).prev_sample
    theirs = x

    # float64 chain on the same network outputs and the same noise draws (one per step, as ours)
    g = torch.Generator().manual_seed(7)
    x = f64(x_T)
    with torch.no_grad():
        for k in reversed(range(250)):
            out = f64(model(x.float(), torch.full((2,), ref.kept[k])))
            mean, log_var, _ = ref.p_learned_range(out, x, np.full(2, k))
            noise = f64(torch.randn(x.shape, generator=g))
            x = mean + (k > 0) * (0.5 * log_var).exp() * noise
    assert torch.isfinite(ours).all() and ours.abs().max() < 10  # the toy chain stays sane
    assert_close(ours, x, "DDPM-250 loop: ours vs float64")
    assert_close(theirs, x, "DDPM-250 loop: diffusers vs float64")
    assert_close(ours, theirs, "DDPM-250 loop: ours vs diffusers")


# ============================================================================ DDIM vs diffusers


def ddim_reference_loop(model, x_T, num_steps, eta=0.0, seed=None):
    """Float64 DDIM over the "ddimN" steps, on the same network outputs (and noise draws)."""
    ref = RefChain(range(0, T, T // num_steps))
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = f64(x_T)
    with torch.no_grad():
        for k in reversed(range(num_steps)):
            eps = f64(model(x.float(), torch.full((x.shape[0],), ref.kept[k]))[:, :C])
            noise = f64(torch.randn(x.shape, generator=g)) if g is not None else None
            x = ref.ddim_step(eps, x, np.full(x.shape[0], k), eta, noise)
    return x


def diffusers_ddim_loop(model, x_T, num_steps, eta=0.0, seed=None):
    sched = diffusers_ddim(num_steps)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = x_T.clone()
    with torch.no_grad():
        for timestep in sched.timesteps:
            eps = model(x, torch.full((x.shape[0],), int(timestep)))[:, :C]  # DDIM takes eps only
            x = sched.step(eps, timestep, x, eta=eta, generator=g).prev_sample
    return x, sched


def test_ddim50_eta0_matches_float64_and_diffusers():
    x_T = torch.randn(2, C, H, W)
    model = ToyDenoiser()
    ours = create_diffusion("ddim50").ddim_sample_loop(model, x_T.shape, noise=x_T, eta=0.0)
    assert model.seen_t == list(range(980, -1, -20))
    theirs, sched = diffusers_ddim_loop(model, x_T, 50)
    assert sched.timesteps.tolist() == list(range(980, -1, -20))
    ref = ddim_reference_loop(model, x_T, 50)
    assert torch.isfinite(ours).all() and ours.abs().max() < 10
    assert_close(ours, ref, "DDIM-50 eta=0: ours vs float64")
    assert_close(theirs, ref, "DDIM-50 eta=0: diffusers vs float64")
    assert_close(ours, theirs, "DDIM-50 eta=0: ours vs diffusers")


def test_ddim_with_eta_matches_diffusers_on_the_same_noise():
    x_T = torch.randn(2, C, H, W)
    model = ToyDenoiser()
    ours = create_diffusion("ddim10").ddim_sample_loop(
        model, x_T.shape, noise=x_T, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    theirs, _ = diffusers_ddim_loop(model, x_T, 10, eta=1.0, seed=3)
    ref = ddim_reference_loop(model, x_T, 10, eta=1.0, seed=3)
    assert_close(ours, ref, "DDIM-10 eta=1: ours vs float64")
    assert_close(theirs, ref, "DDIM-10 eta=1: diffusers vs float64")
    assert_close(ours, theirs, "DDIM-10 eta=1: ours vs diffusers")


# ============================================================================ samplers: reproducibility


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta"])
def test_samplers_are_reproducible_from_noise_and_generator(sampler):
    d = create_diffusion("10")
    model = ToyDenoiser()

    def run(seed, noise=None):
        g = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return d.p_sample_loop(model, (2, C, H, W), noise=noise, generator=g)
        return d.ddim_sample_loop(model, (2, C, H, W), noise=noise, eta=0.5, generator=g)

    x_T = torch.randn(2, C, H, W)
    a, b, c = run(1, x_T), run(1, x_T), run(2, x_T)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2  # a different generator gives different step noise
    # without explicit noise the generator also fixes x_T
    assert torch.equal(run(5), run(5))
    assert (run(5) - run(6)).abs().max() > 1e-2


def test_ddim_eta0_is_deterministic_whatever_the_generator():
    d = create_diffusion("ddim10")
    x_T = torch.randn(2, C, H, W)
    a = d.ddim_sample_loop(ToyDenoiser(), x_T.shape, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(ToyDenoiser(), x_T.shape, noise=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_explicit_noise_of_the_wrong_shape_is_rejected(loop):
    d = create_diffusion("10")
    with pytest.raises(ValueError, match=r"noise shape \(2, 2, 4, 8\) != requested shape \(2, 2, 4, 4\)"):
        getattr(d, loop)(ToyDenoiser(), (2, C, H, W), noise=torch.randn(2, C, H, 2 * W))


def test_p_sample_adds_no_noise_at_t0_and_exact_noise_elsewhere():
    d = create_diffusion("250")
    out, x = random_learned_output(2, seed=9), torch.randn(2, C, H, W)
    model = FixedOutput(out)
    t = torch.tensor([0, 5])  # a mixed batch
    pmv = d.p_mean_variance(model, x, t, clip_denoised=False)
    s1 = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(1))["sample"]
    s2 = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(2))["sample"]
    assert torch.equal(s1[0], pmv["mean"][0]) and torch.equal(s2[0], pmv["mean"][0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert_close(s1[1], pmv["mean"][1] + (0.5 * pmv["log_variance"][1]).exp() * noise[1], "p_sample noise at t>0")
    assert (s1[1] - s2[1]).abs().max() > 1e-3


def test_sample_loop_accepts_a_plain_function_as_model():
    """e.g. a bound `forward_with_cfg`: the device then comes from the noise or defaults to CPU."""
    d = create_diffusion("10")
    toy = ToyDenoiser()

    def fn(x, t):
        return toy(x, t)

    a = d.p_sample_loop(fn, (2, C, H, W), generator=torch.Generator().manual_seed(0))
    b = d.p_sample_loop(toy, (2, C, H, W), generator=torch.Generator().manual_seed(0))
    assert a.device.type == "cpu" and torch.equal(a, b)


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    d = create_diffusion("10")
    model = ToyDenoiser()
    x_T = torch.randn(3, C, H, W)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = d.p_sample_loop(model, x_T.shape, noise=x_T, generator=gens(10, 11, 12))
    alone = d.p_sample_loop(model, (1, C, H, W), noise=x_T[1:2], generator=gens(11))
    assert_close(batch[1:2], alone, "row 1 of a batch vs the same sample alone", atol=1e-6, rtol=0)
    # without explicit noise, x_T row i also comes from generator i
    batch = d.ddim_sample_loop(model, (3, C, H, W), eta=1.0, generator=gens(20, 21, 22))
    alone = d.ddim_sample_loop(model, (1, C, H, W), eta=1.0, generator=gens(22))
    assert_close(batch[2:], alone, "DDIM eta=1 row 2 vs alone", atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 per-sample generators for a batch of 3"):
        d.p_sample_loop(model, x_T.shape, noise=x_T, generator=gens(1, 2))
