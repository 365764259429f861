"""Reporting of a run: the metrics file (`<run dir>/metrics.jsonl`), wandb, the progress bar,
the running means of a log window, and sample grids of the EMA model."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dit.data import item_seed
from dit.distributed import DistEnv, all_reduce_sum, reshard
from dit.io.atomic import write_text_atomic
from dit.io.images import save_grid
from dit.flow import FlowMatching, MeanFlow
from dit.flow.config import is_flow, objective_kind
from dit.sampling.settings import DEFAULT_SPACING, FLOW_GRID_SAMPLER, MEANFLOW_AUTO_STEPS, samplers_of
from dit.sampling.images import sample_images
from dit.train.randomness import GRID_STREAM

log = logging.getLogger(__name__)


class RunLogger:
    """Metrics to `<run dir>/metrics.jsonl`, wandb (rank 0 only) and the tqdm bar (rank 0).

    `wandb` is the config's `log.wandb` (mode, project, entity, group, tags)."""

    def __init__(self, env: DistEnv, out_dir: Path, wandb_cfg, run_name: str, config_dict: dict,
                 run_id: Optional[str], start_step: int, max_steps: int):
        self.env, self.out_dir = env, out_dir
        self.wandb = None
        self.run_id = run_id
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not env.is_main, desc="train",
                        unit="step", dynamic_ncols=True)
        if not env.is_main:
            return
        self.metrics_file = out_dir / "metrics.jsonl"
        _truncate_metrics(self.metrics_file, start_step)
        mode = wandb_cfg.mode.value
        if mode != "disabled":
            import wandb

            if self.run_id is None:  # kept in checkpoints, so a resumed run logs to the same wandb run
                self.run_id = uuid.uuid4().hex[:8]
            self.wandb = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                tags=list(wandb_cfg.tags), name=run_name, id=self.run_id, resume="allow", mode=mode,
                dir=str(out_dir), config=config_dict,
            )

    def step(self) -> None:
        self.bar.update(1)

    def metrics(self, step: int, values: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)
        log.info("step %d  %s", step, "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items()))
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, step: int, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written by an interrupted attempt that is now redone), and
    a line that a crash (or a full disk) cut short."""
    if not path.exists():
        return

    def line_step(raw: bytes) -> float:
        try:  # a line that is not UTF-8 (a flipped byte, a foreign write) is unreadable too
            return json.loads(raw.decode("utf-8"))["step"]
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            return math.inf  # unreadable: dropped

    lines = [raw for raw in path.read_bytes().splitlines() if raw.strip()]
    keep = [raw.decode("utf-8") for raw in lines if line_step(raw) <= step]
    dropped = len(lines) - len(keep)
    if dropped:
        log.info("%s: dropped %d line(s) after step %d or unreadable", path.name, dropped, step)
    write_text_atomic(path, "".join(line + "\n" for line in keep))


class MetricsWindow:
    """Sums of the loss and gradient norm over the updated steps since the last log line, kept
    on the device (no host sync per step), and reduced over ranks at the log step."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_(), self.norm_sum.zero_()
        self.steps, self.good, self.start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, updated: bool) -> None:
        self.steps += 1
        if updated:  # skipped (non-finite) steps are counted, not averaged
            self.loss_sum += loss
            self.norm_sum += grad_norm
            self.good += 1

    def reduce(self, env: DistEnv, flag: bool) -> tuple[float, float, bool, float]:
        """(mean loss, mean grad norm, `flag` on any rank, seconds since the window began): means
        over ranks and the window's updated steps (NaN if there were none). One all-reduce."""
        totals = all_reduce_sum(torch.stack([self.loss_sum, self.norm_sum,
                                             torch.tensor(float(flag), device=self.loss_sum.device)]), env)
        any_flag = totals[2].item() > 0
        elapsed = time.perf_counter() - self.start  # .item() above waited for the device
        if not self.good:
            return float("nan"), float("nan"), any_flag, elapsed
        w, g = env.world_size, self.good
        return totals[0].item() / w / g, totals[1].item() / w / g, any_flag, elapsed


class GridSampler:
    """Sample grids of the EMA model from fixed noise and classes (the same images every time,
    so grids of successive steps are comparable). `settings` is the config's `log.samples`
    (a SamplerSettings with `num_images`)."""

    def __init__(self, settings, seed: int, env: DistEnv, parallel: str, latent_shape: tuple, num_classes: int,
                 out_dir: Path):
        self.settings, self.env, self.out_dir, self.parallel = settings, env, out_dir, parallel
        n = settings.num_images
        g = torch.Generator().manual_seed(item_seed(seed, 0, GRID_STREAM))
        self.noise = torch.randn((n, *latent_shape), generator=g)
        self.labels = torch.arange(n) * num_classes // n  # spread over the classes
        self.seed = item_seed(seed, 1, GRID_STREAM)

    def sample(self, ema_module: nn.Module, objective, autoencoder, step: int) -> Optional[Path]:
        """`objective`: the run's objective, a GaussianDiffusion, a FlowMatching or a MeanFlow."""
        # Under FSDP the sharded EMA model needs every rank in the forward passes; under DDP the
        # replica on rank 0 suffices.
        if not (self.env.is_main or self.parallel == "fsdp"):
            return None
        device = self.env.device
        settings = flow_grid_settings(self.settings, objective_kind(objective)) if is_flow(objective) else self.settings
        images = sample_images(
            ema_module, objective, autoencoder, self.labels.to(device), settings,
            noise=self.noise.to(device), generator=torch.Generator(device=device).manual_seed(self.seed),
        )  # uint8 (N, H, W, 3)
        reshard(ema_module)  # FSDP: back to shards, as the EMA update expects
        if not self.env.is_main:
            return None
        return save_grid(images, self.out_dir / "samples" / f"{step:07d}.png", nrow=int(math.ceil(len(images) ** 0.5)))


def flow_grid_settings(settings, kind: str = "flow"):
    """A flow run's grid settings: its flow sampler as configured (euler | heun | sde | dopri5,
    with its shift and guidance interval in flow time), or the Heun ODE with the grid's
    `num_steps` when `log.samples.sampler` is `auto` or names a diffusion sampler (the grid keys
    are shared with diffusion runs, whose default is DDPM, and so is their `spacing`; a grid never
    stops a run). A MeanFlow run (`kind` "meanflow") keeps meanflow or a flow sampler as
    configured; otherwise its grid is the paper's protocol: one MeanFlow step, cfg_scale 1 (the
    guidance it trains in; log.samples.sampler=meanflow chooses steps and scale)."""
    if kind == "meanflow":
        if settings.sampler in samplers_of("meanflow"):
            return settings
        return dataclasses.replace(settings, sampler="meanflow", num_steps=MEANFLOW_AUTO_STEPS, cfg_scale=1.0,
                                   spacing=DEFAULT_SPACING)
    return settings if settings.is_flow else dataclasses.replace(settings, sampler=FLOW_GRID_SAMPLER,
                                                                 spacing=DEFAULT_SPACING)


def flow_grid_images(model: nn.Module, flow: FlowMatching | MeanFlow, autoencoder, labels: torch.Tensor, settings, *,
                     noise: torch.Tensor, generator=None):
    """A flow (or MeanFlow) model's grid, uint8 (N, H, W, 3): `sample_images` (the sampler path of
    sample.py) with `flow_grid_settings(settings)`, from `noise` at t = 1."""
    return sample_images(model, flow, autoencoder, labels, flow_grid_settings(settings, objective_kind(flow)),
                         noise=noise, generator=generator)
