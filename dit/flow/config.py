"""A flow objective from its record: the `objective` block of a training config, which our
checkpoints keep as `config.objective` (contract 7 in docs/design.md). Training builds its
`FlowMatching` here, and sampling can rebuild the same one from a checkpoint with this function.

    {kind: "flow", path: "linear" | "gvp", prediction: "velocity" | "noise" | "score",
     time_sampling: "uniform" | "logit_normal", logit_mean, logit_std, cosine_weight,
     network_time_scale: 1 | 1000, network_time_data_at_one: false | true}

`network_time_data_at_one` (absent in training configs, whose networks learn our time) marks
weights trained with t = 1 at the data end: SiT's release file (`dit.sampling.trained.RELEASE_OBJECTIVES`).

A record without `kind` (or with kind "diffusion") is not a flow objective.
"""

from __future__ import annotations

from typing import Mapping

from .objective import FlowMatching
from .timesteps import NetworkTime

__all__ = ["OBJECTIVE_KEYS", "REVERSED_TIME_KEY", "SINGULAR_END_EPS", "flow_from_config", "is_flow"]

OBJECTIVE_KEYS = ("kind", "path", "prediction", "time_sampling", "logit_mean", "logit_std", "cosine_weight",
                  "network_time_scale")
# Recorded only for weights trained in the reversed time (not a training option of ours).
REVERSED_TIME_KEY = "network_time_data_at_one"
# Noise and score targets are singular at t = 0 or t = 1 (they divide by sigma or alpha), so those
# models train on [eps, 1 - eps], SiT's train_eps; velocity models use all of [0, 1] as SiT does.
SINGULAR_END_EPS = 1e-3


def is_flow(objective) -> bool:
    """Whether `objective` is a flow objective: the one predicate the project asks, whatever form
    the objective takes: a built `FlowMatching` (a `GaussianDiffusion` is not), a recorded
    `objective` block (a mapping; None, an older checkpoint's, is diffusion), or the training
    schema's `objective` node (its `kind`)."""
    if isinstance(objective, FlowMatching):
        return True
    if objective is None or isinstance(objective, Mapping):
        return (objective or {}).get("kind", "diffusion") == "flow"
    return getattr(objective, "kind", "diffusion") == "flow"


def flow_from_config(objective: Mapping) -> FlowMatching:
    """The `FlowMatching` that a recorded `objective` block describes (missing keys take the
    schema's defaults, SiT's). ValueError for a record that is not a flow objective."""
    d = dict(objective)
    if not is_flow(d):
        raise ValueError(f"objective kind {d.get('kind', 'diffusion')!r} is not a flow objective")
    unknown = set(d) - set(OBJECTIVE_KEYS) - {REVERSED_TIME_KEY}
    if unknown:
        raise ValueError(f"unknown objective keys {sorted(unknown)}: expected {', '.join(OBJECTIVE_KEYS)} "
                         f"(and {REVERSED_TIME_KEY})")
    prediction = d.get("prediction", "velocity")
    eps = 0.0 if prediction == "velocity" else SINGULAR_END_EPS
    return FlowMatching(
        d.get("path", "linear"), prediction, d.get("time_sampling", "uniform"),
        logit_mean=float(d.get("logit_mean", 0.0)), logit_std=float(d.get("logit_std", 1.0)),
        t_min=eps, t_max=1.0 - eps, cosine_weight=float(d.get("cosine_weight", 0.0)),
        network_time=NetworkTime(scale=float(d.get("network_time_scale", 1.0)),
                                 data_at_one=bool(d.get(REVERSED_TIME_KEY, False))),
    )
