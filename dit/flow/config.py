"""A flow objective from its record: the `objective` block of a training config, which our
checkpoints keep as `config.objective` (contract 7 in docs/design.md). Training builds its
`FlowMatching` here, and sampling can rebuild the same one from a checkpoint with this function.

    {kind: "flow", path: "linear" | "gvp", prediction: "velocity" | "noise" | "score",
     time_sampling: "uniform" | "logit_normal", logit_mean, logit_std, cosine_weight,
     network_time_scale: 1 | 1000, network_time_data_at_one: false | true}

`network_time_data_at_one` (absent in training configs, whose networks learn our time) marks
weights trained with t = 1 at the data end: SiT's release file (`dit.sampling.trained.RELEASE_OBJECTIVES`).

A record without `kind` (or with kind "diffusion") is not a flow objective.

MeanFlow (`kind: "meanflow"`, dit/flow/meanflow.py, docs/meanflow.md) is recorded in the same keys
(path "linear", prediction "velocity", its time sampling, network_time_scale); its own options
(the training config's `meanflow` block: `MeanFlowOptions`) are passed beside the record. It counts
as a flow objective (`is_flow`): the same time convention, and the flow samplers integrate its
instantaneous velocity u(z, t, t); `objective_kind` tells it apart ("meanflow").
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from .meanflow import MEANFLOW_TIME_INPUTS, MeanFlow, MeanFlowOptions
from .objective import FlowMatching
from .timesteps import NetworkTime

__all__ = ["OBJECTIVE_KEYS", "OBJECTIVE_KINDS", "REVERSED_TIME_KEY", "SINGULAR_END_EPS", "flow_from_config", "is_flow",
           "meanflow_options", "objective_kind", "time_inputs"]

OBJECTIVE_KINDS = ("diffusion", "flow", "meanflow")

OBJECTIVE_KEYS = ("kind", "path", "prediction", "time_sampling", "logit_mean", "logit_std", "cosine_weight",
                  "network_time_scale")
# Recorded only for weights trained in the reversed time (not a training option of ours).
REVERSED_TIME_KEY = "network_time_data_at_one"
# Noise and score targets are singular at t = 0 or t = 1 (they divide by sigma or alpha), so those
# models train on [eps, 1 - eps], SiT's train_eps; velocity models use all of [0, 1] as SiT does.
SINGULAR_END_EPS = 1e-3


def objective_kind(objective) -> str:
    """"diffusion", "flow" or "meanflow", whatever form the objective takes: a built `FlowMatching`
    or `MeanFlow` (anything else built, a `GaussianDiffusion`, is diffusion), a recorded `objective`
    block (a mapping; None, an older checkpoint's, is diffusion), or the training schema's
    `objective` node (its `kind`)."""
    if isinstance(objective, MeanFlow):
        return "meanflow"
    if isinstance(objective, FlowMatching):
        return "flow"
    if objective is None or isinstance(objective, Mapping):
        return (objective or {}).get("kind", "diffusion")
    return getattr(objective, "kind", "diffusion")


def is_flow(objective) -> bool:
    """Whether `objective` is a flow objective (flow matching or MeanFlow: continuous time, t = 1
    noise, the flow samplers apply): the one predicate the project asks, for any form
    `objective_kind` takes."""
    return objective_kind(objective) in ("flow", "meanflow")


def time_inputs(objective) -> int:
    """`DiTConfig.time_inputs` of a network trained on `objective` (any form `objective_kind` takes):
    2 for MeanFlow ([t, r]), else 1."""
    return MEANFLOW_TIME_INPUTS if objective_kind(objective) == "meanflow" else 1


def meanflow_options(options: Mapping | None) -> MeanFlowOptions:
    """`MeanFlowOptions` from a training config's `meanflow` block (None or missing keys: the
    defaults, the official code's). ValueError for an unknown key or a value out of range."""
    d = dict(options or {})
    known = {f.name for f in dataclasses.fields(MeanFlowOptions)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown meanflow keys {sorted(unknown)}: expected {', '.join(sorted(known))}")
    if "guidance_interval" in d:
        d["guidance_interval"] = tuple(float(v) for v in d["guidance_interval"])
    return MeanFlowOptions(**{k: (float(v) if k != "guidance_interval" else v) for k, v in d.items()})


def flow_from_config(objective: Mapping, meanflow: Mapping | None = None) -> FlowMatching | MeanFlow:
    """The `FlowMatching` that a recorded `objective` block describes (missing keys take the
    schema's defaults, SiT's), or for kind "meanflow" the `MeanFlow` (`meanflow`: the training
    config's `meanflow` block; None: the defaults). ValueError for a record that is not a flow
    objective."""
    d = dict(objective)
    if not is_flow(d):
        raise ValueError(f"objective kind {d.get('kind', 'diffusion')!r} is not a flow objective")
    unknown = set(d) - set(OBJECTIVE_KEYS) - {REVERSED_TIME_KEY}
    if unknown:
        raise ValueError(f"unknown objective keys {sorted(unknown)}: expected {', '.join(OBJECTIVE_KEYS)} "
                         f"(and {REVERSED_TIME_KEY})")
    if objective_kind(d) == "meanflow":
        return _meanflow_from_config(d, meanflow)
    prediction = d.get("prediction", "velocity")
    eps = 0.0 if prediction == "velocity" else SINGULAR_END_EPS
    return FlowMatching(
        d.get("path", "linear"), prediction, d.get("time_sampling", "uniform"),
        logit_mean=float(d.get("logit_mean", 0.0)), logit_std=float(d.get("logit_std", 1.0)),
        t_min=eps, t_max=1.0 - eps, cosine_weight=float(d.get("cosine_weight", 0.0)),
        network_time=NetworkTime(scale=float(d.get("network_time_scale", 1.0)),
                                 data_at_one=bool(d.get(REVERSED_TIME_KEY, False))),
    )


def _meanflow_from_config(d: dict, meanflow: Mapping | None) -> MeanFlow:
    """MeanFlow from its record: the linear path, velocity (average velocity) prediction, no
    reversed time and no cosine term, which its record must say (or leave out)."""
    fixed = {"path": "linear", "prediction": "velocity", "cosine_weight": 0.0, REVERSED_TIME_KEY: False}
    for key, value in fixed.items():
        if key in d and d[key] != value:
            raise ValueError(f"objective.{key}={d[key]!r} is not supported by MeanFlow (it needs {value!r})")
    return MeanFlow(d.get("time_sampling", "logit_normal"), logit_mean=float(d.get("logit_mean", -0.4)),
                    logit_std=float(d.get("logit_std", 1.0)), options=meanflow_options(meanflow),
                    network_time=NetworkTime(scale=float(d.get("network_time_scale", 1.0))))
