"""The one sampler interface, and the table of sampler classes by name.

Every sampler, whatever its family, is a `Sampler`: built once per run from resolved settings and
the objective the model was trained with, it answers one call,

    x, nfe = sampler.sample(denoiser, noise, generator=..., progress=...)

`denoiser(x, t_net)` is the network as the sampler sees it: the model with the labels bound and
classifier-free guidance applied (`dit.sampling.guidance.GuidedDenoiser`), taking the network's
own time input (DDPM timesteps for diffusion models; `NetworkTime` of flow time for flow models).
`noise` is x at the noise end, (B, C, H, W); the result is x at the data end and the number of
network evaluations per sample (a guided evaluation is one pass over both halves). `generator`
carries the per-step noise of stochastic samplers: one generator, or one per sample (then every
sample's result is independent of its batch). This is the shape of diffusers' schedulers and
SiT's `Sampler`: callers never know which sampler they hold.

A new sampler is one subclass, registered with `@register_sampler`, and one conf/sampler/<name>.yaml
(`name: <name>` and the `SamplerSettings` knobs it reads). The built-in classes are in
diffusion.py and flow.py; `dit.sampling.samplers.build_sampler` turns settings into an instance.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Sequence

import torch

__all__ = ["FAMILIES", "Sampler", "register_sampler", "unregister_sampler", "registered_samplers", "sampler_class"]

# the objective a sampler walks: DDPM time, flow time, or a MeanFlow model's average velocity in flow time
FAMILIES = ("diffusion", "flow", "meanflow")
Generator = torch.Generator | Sequence[torch.Generator] | None

_REGISTRY: dict[str, type["Sampler"]] = {}


class Sampler(abc.ABC):
    """One way of drawing samples from a trained objective (see the module docstring).

    Class attributes: `name` (the `sampler=` value) and `family` ("diffusion", "flow" or
    "meanflow": the objective it walks). An instance holds the resolved `settings` (a
    `SamplerSettings` whose `sampler` is this class's name, checked) and the `objective` (a
    `GaussianDiffusion` holding the training chain, a `dit.flow.FlowMatching`, or a
    `dit.flow.MeanFlow`, which the flow samplers also take)."""

    name: ClassVar[str]
    family: ClassVar[str]
    # The guide model of guidance=autoguidance (`build_sampler(..., guide=)`), None otherwise: the
    # denoiser of every draw calls it beside the model (dit/sampling/guidance.py).
    guide = None

    def __init__(self, settings, objective):
        if settings.sampler != self.name:
            raise ValueError(f"the {self.name} sampler was given settings for sampler={settings.sampler}")
        self.settings = settings
        self.objective = objective

    @property
    def network_time(self):
        """How the denoiser's time input maps to the time a guidance interval is given in: None
        for diffusion samplers (DDPM timesteps both), the flow objective's `NetworkTime` else."""
        return None if self.family == "diffusion" else self.objective.network_time

    @abc.abstractmethod
    def sample(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, *,
               generator: Generator = None, progress: bool = False) -> tuple[torch.Tensor, int]:
        """(x at the data end, network evaluations per sample) from `noise` at the noise end."""

    def describe(self) -> str:
        """What progress bars say: "ddpm, 250 steps"."""
        return f"{self.name}, {self.settings.num_steps} steps"


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: make `cls` the sampler named `cls.name` (refuses a second class of the
    same name, and a family other than FAMILIES)."""
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise TypeError(f"{cls!r} is not a Sampler subclass")
    if getattr(cls, "family", None) not in FAMILIES:
        raise ValueError(f"sampler {cls.__name__} must set family to one of {FAMILIES}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"sampler {cls.__name__} needs a name (a string other than 'auto')")
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"a sampler named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def unregister_sampler(name: str) -> None:
    """Forget a registered sampler (a plugin's tests clean up with it)."""
    _REGISTRY.pop(name, None)


def registered_samplers(family: str | None = None) -> tuple[str, ...]:
    """The names of the registered samplers (of one family), in registration order."""
    return tuple(n for n, c in _REGISTRY.items() if family is None or c.family == family)


def sampler_class(name: str) -> type[Sampler] | None:
    return _REGISTRY.get(name)
