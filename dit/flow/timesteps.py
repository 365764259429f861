"""Time in flow objectives: drawing training times, the sampler's time grid with the optional
SD3 / LightningDiT shift, and what the network's timestep embedder receives (`NetworkTime`).

Our convention (package docstring): t = 0 is data, t = 1 is noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["TIMESTEP_SAMPLING", "SIT_TIME", "sample_uniform", "sample_logit_normal", "shift_time", "time_grid", "NetworkTime"]

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_uniform(n: int, *, t_min: float = 0.0, t_max: float = 1.0, generator: torch.Generator | None = None,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """(n,) times uniform on [t_min, t_max] (SiT; noise / score models keep away from the ends,
    SiT's train_eps = 1e-3)."""
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    return t_min + (t_max - t_min) * u


def sample_logit_normal(n: int, *, mean: float = 0.0, std: float = 1.0, t_min: float = 0.0, t_max: float = 1.0,
                        generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n,) times t = t_min + (t_max - t_min) sigmoid(mean + std n), n ~ N(0, 1): logit(t) is normal
    (SD3, LightningDiT). Density in t: N(logit t; mean, std) / (t (1 - t)). In our convention
    (t = 1 noise) mean > 0 puts more training on the noisy end, as in SD3; LightningDiT draws in
    SiT's time (t = 1 data), so its `shifted_mu` m is mean = -m here (m = 0 is the same)."""
    if not std > 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    z = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return t_min + (t_max - t_min) * torch.sigmoid(mean + std * z)


def shift_time(t, shift: float):
    """t' = shift t / (1 + (shift - 1) t), in our convention (t = 1 noise): 0 and 1 stay fixed,
    shift > 1 moves every intermediate time towards noise (SD3's resolution shift, which spends
    more of a fixed step budget at high noise), shift < 1 towards data, shift = 1 is the identity.
    The same formula applied in SiT's time s = 1 - t with parameter k equals this one with
    shift = 1 / k: LightningDiT's `timestep_shift: 0.3` is shift = 1 / 0.3 here."""
    if not shift > 0:
        raise ValueError(f"timestep shift must be > 0 (1 = no shift), got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def time_grid(num_steps: int, *, t_max: float = 1.0, t_min: float = 0.0, shift: float = 1.0,
              dtype=torch.float64) -> torch.Tensor:
    """num_steps + 1 decreasing times from t_max (noisiest) to t_min, evenly spaced, then shifted
    (LightningDiT shifts every grid point, ends included)."""
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"the time grid needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    grid = torch.linspace(t_max, t_min, int(num_steps) + 1, dtype=dtype)
    return grid if shift == 1 else shift_time(grid, shift)


@dataclass(frozen=True)
class NetworkTime:
    """What the network's timestep embedder receives for our time t (t = 0 data, t = 1 noise):
    `scale * t`, or `scale * (1 - t)` when the network was trained with t = 1 at the data end
    (`data_at_one`: SiT's and LightningDiT's weights; then their velocity points the other way
    too and `dit.flow.model_velocity` flips its sign). `scale` is 1 for SiT / REPA / LightningDiT
    (t in [0, 1] fed to DiT's sin-cos embedder as is) or 1000 to give the embedder DDPM-sized
    inputs. Recorded with a flow model (`to_dict` / `from_dict`) so its weights sample correctly."""

    scale: float = 1.0
    data_at_one: bool = False

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"NetworkTime.scale must be > 0 (1: t in [0, 1], 1000: DDPM-sized), got {self.scale}")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Our t (B,) -> the network's timestep input (B,)."""
        return self.scale * ((1 - t) if self.data_at_one else t)

    def flow_time(self, t_net: torch.Tensor | float) -> torch.Tensor | float:
        """The inverse of `__call__`: the network's timestep input -> our t (t = 1 noise). What a
        guidance interval in flow time is compared with when only the network's input is seen."""
        t = t_net / self.scale
        return (1 - t) if self.data_at_one else t

    @property
    def velocity_sign(self) -> float:
        """+1 when the network's time runs as ours, -1 when reversed (d/ds = -d/dt for s = 1 - t)."""
        return -1.0 if self.data_at_one else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "NetworkTime":
        d = dict(d or {})
        unknown = set(d) - {"scale", "data_at_one"}
        if unknown:
            raise ValueError(f"unknown NetworkTime fields {sorted(unknown)}: expected scale, data_at_one")
        return cls(scale=float(d.get("scale", 1.0)), data_at_one=bool(d.get("data_at_one", False)))


SIT_TIME = NetworkTime(scale=1.0, data_at_one=True)  # SiT / LightningDiT released weights
