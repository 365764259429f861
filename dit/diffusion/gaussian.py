"""Gaussian diffusion (Ho et al. 2020) with the learned variance of Nichol & Dhariwal (2021).

One class serves both the full 1000-step chain (training) and respaced chains (sampling):
`t` everywhere is an index into *this* chain, and the network is always called with the
original timestep `timestep_map[t]` (contract 5 in docs/design.md).

Schedule constants are float64 numpy arrays; a value indexed by a batch of `t` is handed to
torch as float32 before it meets the network's tensors (the reference numerics).
"""

from __future__ import annotations

import enum
import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedule import respace_betas


class MeanType(enum.Enum):
    EPSILON = "epsilon"  # the network predicts the noise (DiT)
    START_X = "start_x"  # the network predicts x_0


class VarType(enum.Enum):
    LEARNED_RANGE = "learned_range"  # log-variance interpolated between beta_tilde and beta (DiT)
    FIXED_SMALL = "fixed_small"  # the posterior variance beta_tilde
    FIXED_LARGE = "fixed_large"  # beta (with beta_tilde at t=0 for a finite decoder)


class LossType(enum.Enum):
    MSE = "mse"  # epsilon MSE (+ VLB on the variance when it is learned): DiT's hybrid loss
    RESCALED_MSE = "rescaled_mse"  # the VLB term scaled by T / 1000
    KL = "kl"  # the variational bound alone, scaled by T (an unbiased estimate of the full bound)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by DDPM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)).
    The outermost bins extend to -inf and +inf. Elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Forward process, posterior, network parameterisation, losses and samplers.

    Args:
        betas: the base schedule (float64, length T, usually 1000).
        use_timesteps: the subset of base steps this chain visits (None: all of them).
        mean_type, var_type, loss_type: see the enums above.
    """

    def __init__(
        self,
        betas: np.ndarray,
        use_timesteps: list[int] | None = None,
        mean_type: MeanType = MeanType.EPSILON,
        var_type: VarType = VarType.LEARNED_RANGE,
        loss_type: LossType = LossType.MSE,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.original_num_steps = len(betas)
        if use_timesteps is None:
            timestep_map = np.arange(len(betas))
        else:
            betas, timestep_map = respace_betas(betas, use_timesteps)
        self.timestep_map = timestep_map
        self.betas = betas
        self.num_timesteps = len(betas)
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0: its log is clipped to beta_tilde_1 so the learned range stays finite.
        if len(betas) > 1:
            self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.array([], dtype=np.float64)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ---------------------------------------------------------------------------- helpers

    @staticmethod
    def _extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """arr[t] as float32 on t's device, broadcastable to `shape`."""
        out = torch.from_numpy(arr).to(device=t.device)[t].float()
        return out.reshape(out.shape + (1,) * (len(shape) - out.ndim))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Chain indices -> the original timesteps the network was trained on."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    @property
    def learns_sigma(self) -> bool:
        return self.var_type == VarType.LEARNED_RANGE

    # ---------------------------------------------------------------------------- q

    def q_mean_variance(self, x_start, t):
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t.shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ---------------------------------------------------------------------------- p

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable | None = None,
    ) -> dict:
        """Turn a network output at (x_t, t) into p(x_{t-1} | x_t): mean, variance, log-variance
        and the implied x_0. With a learned range, the extra channels v in [-1, 1] interpolate the
        log-variance: log sigma^2 = (v+1)/2 log beta_t + (1-v)/2 log beta_tilde_t."""
        B, C = x.shape[:2]
        if self.var_type == VarType.LEARNED_RANGE:
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learned sigma needs {2 * C} output channels for {C} input channels, got {model_output.shape[1]}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.var_type == VarType.FIXED_LARGE:
                # beta_t, with beta_tilde_1 in place of beta_0 so the t=0 decoder stays sensible.
                variance = np.append(self.posterior_variance[1], self.betas[1:])
                log_variance = np.log(variance)
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = self._extract(variance, t, x.shape).expand(x.shape)
            model_log_variance = self._extract(log_variance, t, x.shape).expand(x.shape)
            if model_output.shape[1] != C:
                model_output = model_output[:, :C]

        def process(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.mean_type == MeanType.START_X:
            pred_xstart = process(model_output)
        else:
            pred_xstart = process(self.predict_xstart_from_eps(x, t, model_output))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None) -> dict:
        """Call the network at chain index t (it sees the original timestep) and parameterise
        p(x_{t-1} | x_t). `model(x, timesteps, **model_kwargs)`."""
        model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    # ---------------------------------------------------------------------------- losses

    def _vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """One term of the variational bound, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) ||
        p(x_{t-1}|x_t)) for t > 0, the discretised decoder NLL of x_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses at chain indices t. Returns {"loss", "mse", "vb"} (each (B,)).

        DiT's hybrid objective with learned sigma: `mse` = ||eps - eps_hat||^2 (mean over
        dimensions) trains the mean; `vb` is the variational bound evaluated with the predicted
        mean *detached*, so its gradient reaches only the variance channels.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        return self.losses_from_output(model_output, x_start, x_t, t, noise)

    def losses_from_output(self, model_output, x_start, x_t, t, noise) -> dict:
        """The loss terms for a network output already computed at (x_t, t)."""
        terms = {}
        if self.loss_type == LossType.KL:
            terms["vb"] = self._vb_terms_bpd(model_output, x_start, x_t, t)
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms

        C = x_start.shape[1]
        if self.var_type == VarType.LEARNED_RANGE:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned sigma needs {2 * C} output channels, got {model_output.shape[1]}")
            mean_out, var_values = torch.split(model_output, C, dim=1)
            # The bound must not move the mean: it is trained by the MSE term alone.
            frozen = torch.cat([mean_out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                # The MSE is a mean over dimensions while the bound sums over T terms.
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0
        else:
            mean_out = model_output

        if self.mean_type == MeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - mean_out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ---------------------------------------------------------------------------- sampling

    @staticmethod
    def _randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise on `device`, drawn on the generator's own device: a CPU generator
        then gives the same numbers whether we sample on CPU or GPU (torch.randn refuses a CPU
        generator with a CUDA `device`)."""
        if isinstance(generator, (list, tuple)):
            # One generator per sample (bulk sampling, dit.sampling): sample i's noise then does
            # not depend on which other samples share its batch.
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} per-sample generators for a batch of {shape[0]}")
            return torch.stack([GaussianDiffusion._randn(shape[1:], g, device, dtype) for g in generator])
        draw_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)

    @classmethod
    def _noise_like(cls, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return cls._randn(x.shape, generator, x.device, x.dtype)

    def p_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None, generator=None) -> dict:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = self._noise_like(x, generator)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None, eta=0.0, generator=None) -> dict:
        """One DDIM step (Song et al. 2021, eq. 12); eta=0 is deterministic, eta=1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero * sigma * self._noise_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step_fn, model, shape, noise, device, progress, generator, **step_kwargs) -> torch.Tensor:
        if device is None:
            if noise is not None:
                device = noise.device
            else:  # `model` may be a module, a bound method (DiT.forward_with_cfg) or a plain function
                owner = getattr(model, "__self__", model)
                param = next(owner.parameters(), None) if isinstance(owner, torch.nn.Module) else None
                device = param.device if param is not None else torch.device("cpu")
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            img = noise.to(device)
        else:
            img = self._randn(shape, generator, device)
        steps = list(range(self.num_timesteps))[::-1]
        for i in tqdm(steps, desc="sampling", disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                img = step_fn(model, img, t, generator=generator, **step_kwargs)["sample"]
        return img

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator=None) -> torch.Tensor:
        """Ancestral sampling from x_T = `noise` (or fresh noise from `generator`) down to x_0."""
        return self._loop(self.p_sample, model, shape, noise, device, progress, generator,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, generator=None) -> torch.Tensor:
        """DDIM sampling over this chain's timesteps (respace with "ddimN" for N steps)."""
        return self._loop(self.ddim_sample, model, shape, noise, device, progress, generator,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta)
