"""What a sampler walks: the objective the model was trained with (read from the checkpoint's
config): a Gaussian diffusion chain, which the diffusion samplers respace to their number of
steps (DDPM / DDIM, and DPM-Solver++ on its betas; dit/sampling/diffusion.py), or a flow objective
(`dit.flow.FlowMatching`) integrated by the flow samplers (dit/sampling/flow.py).

A run trained with `diffusion.noise_schedule=cosine` or `diffusion.diffusion_steps=500` must be
sampled on that chain: its network has only seen the noise levels of that schedule, at timesteps
0..diffusion_steps-1. Our checkpoints record the training config (contract 2 in
docs/design.md); release files record none: DiT's were trained on the linear 1000-step chain,
SiT's on the linear flow path with t = 1 at the data end (`RELEASE_OBJECTIVES`; which release a
file is comes from its name, `dit.io.release.release_family`).

A flow objective is recorded as `config.objective` (`dit.flow.config`); its absence, or kind
"diffusion", means the diffusion chain of `config.diffusion`. Kind "meanflow" (a MeanFlow model,
dit/flow/meanflow.py) is a flow objective too, with its options in `config.meanflow`.
"""

from __future__ import annotations

from collections.abc import Mapping

from dit.diffusion import GaussianDiffusion, create_diffusion
from dit.flow import FlowMatching, MeanFlow
from dit.flow.config import flow_from_config, is_flow
from dit.flow.config import objective_kind as _objective_kind  # the one definition, in dit/flow

# What a file without a training config (a release file) was trained on: DiT's chain, which is
# also the training schema's default (dit/config/schema.py, DiffusionConfig).
RELEASE_CHAIN = {"noise_schedule": "linear", "diffusion_steps": 1000}
# The objective of each release family, as `config.objective` records ours (None: diffusion,
# RELEASE_CHAIN). SiT (willisma/SiT): linear path, velocity prediction, t in [0, 1] fed to DiT's
# embedder as is, but t = 1 is data there: the network receives 1 - t and predicts x0 - eps.
RELEASE_OBJECTIVES = {
    "dit": None,
    "sit": {"kind": "flow", "path": "linear", "prediction": "velocity", "network_time_scale": 1.0,
            "network_time_data_at_one": True},
}


def objective_from_config(config: Mapping | None) -> dict | None:
    """The flow objective record (`config.objective`) of a training config or of the provenance
    recorded next to samples, or None for a diffusion model (no `objective` node, or kind
    "diffusion"): what decides which sampler family fits a checkpoint."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"a training config must be a mapping (a checkpoint's `config`), got {type(config).__name__}")
    objective = (config or {}).get("objective")
    return dict(objective) if is_flow(objective) else None


def trained_objective(config: Mapping | None, learn_sigma: bool) -> GaussianDiffusion | FlowMatching | MeanFlow:
    """What the model was trained on, ready to sample: the `FlowMatching` (or `MeanFlow`, with the
    config's `meanflow` options) of a flow objective record, else the full diffusion chain
    (`diffusion_from_config`)."""
    objective = objective_from_config(config)
    if objective is None:
        return diffusion_from_config(config, learn_sigma)
    try:
        return flow_from_config(objective, (config or {}).get("meanflow"))
    except ValueError as err:
        raise ValueError(f"the checkpoint's config records objective={objective}, which this code cannot build: "
                         f"{err}") from None


def objective_kind(objective) -> str:
    """"flow" for a FlowMatching, "meanflow" for a MeanFlow, "diffusion" for a GaussianDiffusion or
    None (the release chain)."""
    return _objective_kind(objective)


def trained_chain(config: Mapping | None) -> dict:
    """{"noise_schedule", "diffusion_steps"} of the chain a model was trained on, from any mapping
    with a `diffusion` node (a checkpoint's training config, or the settings recorded next to
    samples); None, or a config without that node: the release chain (linear, 1000 steps)."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"a training config must be a mapping (a checkpoint's `config`), got {type(config).__name__}")
    node = (config or {}).get("diffusion") or {}
    chain = {key: node.get(key, default) for key, default in RELEASE_CHAIN.items()}
    steps = chain["diffusion_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"the checkpoint's config says diffusion.diffusion_steps={steps!r}: it must be an integer >= 2")
    return chain


def diffusion_from_config(config: Mapping | None, learn_sigma: bool) -> GaussianDiffusion:
    """The full (not respaced) chain the model was trained on (`trained_chain(config)`), with the
    learned variance when the model predicts it. A release file's None gives DiT's linear
    1000-step chain."""
    chain = trained_chain(config)
    try:
        return create_diffusion("", noise_schedule=chain["noise_schedule"], learn_sigma=learn_sigma,
                                diffusion_steps=chain["diffusion_steps"])
    except ValueError as err:
        raise ValueError(f"the checkpoint's config says diffusion.noise_schedule={chain['noise_schedule']!r}, which "
                         f"this code cannot build: {err}") from None
