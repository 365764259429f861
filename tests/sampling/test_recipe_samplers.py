"""The FID commands of docs/recipes.md sample what the papers' own samplers give (issue 22).
Each `eval_fid.py protocol=...` line of the doc is composed as written, then run through our
sampling stack on a tiny model and compared, step for step, with a loop written here from the
paper's sampler (its time convention, its grid, its guidance rule and channels):

- SiT (willisma/SiT@947f95b, transport/integrators.py sde / transport.py, models.py:249-265):
  its time s = 0 noise .. 1 data, velocity d x / ds; Euler-Maruyama on s = linspace(0, 0.96, 250)
  with the "sigma" diffusion w(s) = 1 - s, drift v + w score, noise sqrt(2 w ds), then a noiseless
  "mean" step of 0.04; guidance mixes channels [:3].
- REPA (sihyun-yu/REPA@67f7145, samplers.py:122-181): its time is ours (t = 1 noise); t =
  linspace(1, 0.04, 250) then 0, diffusion 2t, drift v - t score, noise sqrt(2t |dt|), the last
  step the drift alone; guidance on all channels while t <= guidance_high.
- LightningDiT (hustvl/LightningDiT@2725fed, transport/integrators.py:94-101,
  models/lightningdit.py:425-440): SiT's time; Euler on linspace(0, 1, 250) with every point
  shifted s -> 0.3 s / (1 - 0.7 s), 249 steps; guidance on [:3] from s >= cfg_interval_start.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import compose_config, tiny_dit
from dit.config import to_eval_config
from dit.flow import SIT_TIME, FlowMatching, NetworkTime
from dit.sampling.images import sample_latents

RECIPES_DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def doc_commands() -> list[list[str]]:
    """The overrides of every `eval_fid.py protocol=...` command in docs/recipes.md (line
    continuations joined), without checkpoint= and reference=."""
    text = RECIPES_DOC.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if "eval_fid.py" in line and "protocol=" in line:
            args = shlex.split(line.split("eval_fid.py", 1)[1])
            commands.append([a for a in args if not a.startswith(("checkpoint=", "reference="))])
    return commands


def _cond_uncond(model, x, s, labels, scale, channels, guided):
    """One guided network output in the paper's terms: conditional and null-label halves, mixed
    on the first `channels` output channels (None: all), the rest taken from the conditional half."""
    out = model(x, s, labels)[:, : x.shape[1]]
    if not guided or scale == 1:
        return out
    null = torch.full_like(labels, model.config.num_classes)
    uncond = model(x, s, null)[:, : x.shape[1]]
    k = x.shape[1] if channels is None else channels
    mixed = out.clone()
    mixed[:, :k] = uncond[:, :k] + scale * (out[:, :k] - uncond[:, :k])
    return mixed


def sit_sde(model, noise, labels, gen, *, steps, scale, channels=3, last=0.04):
    x = noise.clone()
    s_grid = torch.linspace(0.0, 1.0 - last, steps, dtype=torch.float64).tolist()

    def drift(x, s):
        sb = torch.full((len(x),), s, dtype=x.dtype)
        v = _cond_uncond(model, x, sb, labels, scale, channels, True)
        score = -(x - s * v) / (1 - s)  # linear path, SiT's time: x = s x1 + (1 - s) eps
        return v + (1 - s) * score

    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        ds = s_next - s
        x = x + drift(x, s) * ds + torch.sqrt(torch.tensor(2 * (1 - s) * ds, dtype=x.dtype)) * torch.randn(
            x.shape, generator=gen, dtype=x.dtype)
    return x + drift(x, s_grid[-1]) * last


def repa_sde(model, noise, labels, gen, *, steps, scale, high, channels=None, last=0.04):
    x = noise.clone()
    t_grid = torch.linspace(1.0, last, steps, dtype=torch.float64).tolist() + [0.0]

    def drift(x, t):
        tb = torch.full((len(x),), t, dtype=x.dtype)
        v = _cond_uncond(model, x, tb, labels, scale, channels, high is None or t <= high)
        score = -(x + (1 - t) * v) / t  # x = (1 - t) x0 + t eps, v = eps - x0
        return v - 0.5 * (2 * t) * score

    for t, t_next in zip(t_grid[:-2], t_grid[1:-1]):
        dt = t_next - t
        noise_i = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = x + drift(x, t) * dt + torch.sqrt(torch.tensor(2 * t, dtype=x.dtype)) * noise_i * abs(dt) ** 0.5
    return x + drift(x, t_grid[-2]) * (t_grid[-1] - t_grid[-2])


def lightningdit_euler(model, noise, labels, gen, *, steps, scale, start, shift=0.3, channels=3):
    x = noise.clone()
    s = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    s = (shift * s / (1 - (1 - shift) * s)).tolist()
    for s_cur, s_next in zip(s[:-1], s[1:]):
        sb = torch.full((len(x),), s_cur, dtype=x.dtype)
        x = x + (s_next - s_cur) * _cond_uncond(model, x, sb, labels, scale, channels, s_cur >= start)
    return x


# protocol -> (the paper's loop, its network's time convention, learned sigma, the paper's knobs)
PAPERS = {
    "SiT-XL-2-256": (sit_sde, SIT_TIME, True, dict(steps=250, scale=1.5)),
    "REPA-SiT-XL-2-256": (repa_sde, NetworkTime(), False, dict(steps=250, scale=1.8, high=0.7)),
    "LightningDiT-XL-2-256": (lightningdit_euler, SIT_TIME, False, dict(steps=250, scale=10.0, start=0.10)),
}


def _knobs_of(command: list[str], knobs: dict) -> dict:
    """The paper's knobs, with the variants a doc command spells out (REPA without its interval,
    LightningDiT's 800-epoch cfg and interval start)."""
    knobs = dict(knobs)
    for arg in command:
        key, _, value = arg.partition("=")
        if key == "bulk.cfg_scale":
            knobs["scale"] = float(value)
        elif key == "guidance_interval":
            hi = None if value == "null" else float(re.findall(r"[-0-9.]+", value)[1])
            if "high" in knobs:
                knobs["high"] = hi
            else:
                knobs["start"] = 1 - hi
    return knobs


def test_the_doc_names_every_flow_protocol():
    named = {next(a for a in c if a.startswith("protocol=")).split("=", 1)[1] for c in doc_commands()}
    assert set(PAPERS) <= named and named <= set(PAPERS) | {"DiT-XL-2-256", "DiT-XL-2-512"}


@pytest.mark.parametrize("command", [c for c in doc_commands()
                                     if any(a.split("=", 1)[1] in PAPERS for a in c if a.startswith("protocol="))],
                         ids=" ".join)
def test_each_doc_command_samples_what_the_papers_sampler_gives(command):
    name = next(a for a in command if a.startswith("protocol=")).split("=", 1)[1]
    loop, network_time, learn_sigma, knobs = PAPERS[name]
    cfg = to_eval_config(compose_config("eval", [*command, "reference=ref.npz"]))
    settings = cfg.sampler_settings(cfg.bulk.cfg_scale)
    model = tiny_dit(learn_sigma=learn_sigma, noise=0.2)
    labels = torch.tensor([0, 3, 4])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample_latents(model, FlowMatching("linear", network_time=network_time), labels, settings, noise=noise,
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = loop(model, noise, labels, torch.Generator().manual_seed(1), **_knobs_of(command, knobs))
    assert torch.isfinite(theirs).all() and theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
