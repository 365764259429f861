"""Classifier-free guidance, in one place for every sampler: `GuidedDenoiser` binds the labels to
the network and mixes its conditional and unconditional (null class) outputs as the settings say:
the scale, which output channels are guided (contract 6 in docs/design.md: "3" reproduces DiT's
numbers, "all" is the principled choice) and the optional guidance interval (Kynkäänniemi et al.
2024), in DDPM timesteps for diffusion samplers and in flow time for flow samplers.

The conditional and unconditional passes run as one batch through `DiT.forward_with_cfg`;
`cfg_scale == 1` skips the unconditional pass entirely, and so does any step outside the interval.
"""

from __future__ import annotations

import contextlib

import torch

from dit.autoencoder import warn_partial_guidance
from dit.flow import NetworkTime
from dit.models import null_class, parse_guided_channels
from dit.sampling.precision import forward_precision
from dit.sampling.settings import SamplerSettings

__all__ = ["GuidedDenoiser", "unwrap_model", "eval_mode"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)  # DDP / FSDP wrappers


class GuidedDenoiser:
    """fn(x (B, C, H, W), t (B,) the network's timestep input) -> the network output (B, C_out,
    H, W) with classifier-free guidance applied as `settings` say. Counts network passes (`calls`)
    and rows (`rows`): a guided step is one pass over 2B rows, an unguided one a pass over B rows.

    `network_time`: None for a diffusion model (t: original DDPM timesteps, compared with the
    guidance interval as integers); a flow model's `NetworkTime`, which maps the network's input
    back to our flow time t in [0, 1] (t = 1 noise), the time its guidance interval is given in."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, settings: SamplerSettings,
                 network_time: NetworkTime | None = None):
        self.model = model
        self.precision = settings.precision
        num_classes = model.config.num_classes
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{num_classes - 1}")
        self.guided = float(settings.cfg_scale) != 1.0
        if self.guided and model.y_embedder.embedding_table.num_embeddings <= num_classes:
            raise ValueError("cfg_scale != 1 needs the null-class embedding, but this model was built with "
                             "class_dropout_prob=0: sample with cfg_scale=1")
        interval = settings.guidance_interval
        self.labels = labels
        self.null = torch.full_like(labels, null_class(num_classes))
        self.cfg_scale = float(settings.cfg_scale)
        self.guided_channels = parse_guided_channels(settings.guided_channels_value, model.config.in_channels)
        if self.guided:  # "3" on a latent space other than SD's 4 channels guides an arbitrary subset
            warn_partial_guidance(settings.guided_channels_value, model.config.in_channels)
        self.network_time = network_time
        if interval is None:
            self.interval = None
        elif network_time is None:
            self.interval = (int(interval[0]), int(interval[1]))
        else:
            self.interval = (float(interval[0]), float(interval[1]))
        self.calls = self.rows = 0

    def guides_at(self, t: int | float) -> bool:
        """Whether the step at t is guided: an original timestep (diffusion) or our flow time."""
        if not self.guided:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def step_time(self, t: torch.Tensor) -> int | float:
        """The time of a batch's step in the interval's units: DDPM time read as an integer
        (diffusion), our flow time as a float (flow; the network may see 1 - t or 1000 t). A
        MeanFlow network's input is (B, 2) = [t, r]: its step is at t, where the jump starts."""
        if self.network_time is None:
            return int(t[0])
        first = t[0] if t.ndim == 1 else t[0, 0]
        return float(self.network_time.flow_time(first.double()))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_unused) -> torch.Tensor:
        self.calls += 1
        # All samples of a batch are at the same step, so one decision serves the batch.
        guided = self.guides_at(self.step_time(t))
        self.rows += (2 if guided else 1) * len(x)
        # bf16 autocasts the network (with forward_with_cfg's guidance mix); the chain gets float32.
        with forward_precision(self.precision, x.device):
            if not guided:
                return self.model(x, t, self.labels).float()
            both = torch.cat([x, x])  # (2B, C, H, W): conditional half, then unconditional half
            out = self.model.forward_with_cfg(both, torch.cat([t, t]), torch.cat([self.labels, self.null]),
                                              self.cfg_scale, self.guided_channels)
        return out[: len(x)].float()  # both halves hold the same guided output


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Sampling must not drop labels (the label embedder drops them in training mode)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

