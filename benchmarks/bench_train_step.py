"""Training-step throughput: our DiT and training step against diffusers' DiTTransformer2DModel of
the same shape driven by the reference recipe, and utilisation of the measured matmul peak.

    python benchmarks/bench_train_step.py                                  # DiT-S/2 and DiT-B/4, CPU fp32, batch 8 (~4 min on 2 cores)
    python benchmarks/bench_train_step.py --models DiT-S/2 --repeats 9 --extra
    python benchmarks/bench_train_step.py --device cuda --models DiT-XL/2 --batch-size 32

Variants (each one full optimizer step on the same batch: diffusion timesteps and noise drawn,
forward, DiT's hybrid loss, backward, AdamW, EMA):
  ours        dit.models.DiT + the project's own step, `dit.train.step.train_step`, as the trainer
              calls it: per-step randomness and label dropout, fused AdamW (`build_optimizer`),
              the global grad norm, the non-finite check (`NonFiniteGuard`), the one-kernel EMA.
  diffusers   diffusers' DiTTransformer2DModel (12 layers for S, 6 heads of 64, patch 2, 4 -> 8
              channels, 1000 classes), the peer we can run in the same process, with the
              reference recipe: `torch.optim.AdamW(lr=1e-4, weight_decay=0)` as constructed there
              (torch's default implementation for the device) and an EMA updated tensor by tensor.
  reference   our model with that reference recipe: the reference step as far as the model is
              the same computation (it is: same layers, same numerics).
  --compile adds `ours+compile` (`model.compile()`, train.py's compile=true; compilation happens in
  the first warm-up step, whose time is printed).
  --extra adds `diffusers+ours` (the peer model with our step) and `ours, default malloc` (our
  step without `dit.cli.runtime.tune_host_allocator`), to separate model, recipe and process setup.

Each variant lives in its own worker process, set up as its entry point would set it up: ours
with `tune_host_allocator()` as train.py calls it, the reference recipes with glibc's defaults as
their scripts run (the allocator is a per-process setting, so they cannot share one process).
The parent triggers one step of each in turn, repetition by repetition, so all see the same
load on a shared machine; `--warmup` steps of each are not timed. FLOPs per step come from torch's FlopCounterMode over one
forward and backward of our model (matmuls and attention; the same count is used for every
variant, as they train the same architecture); "% of peak" divides the achieved model FLOP/s by the
fp32 (or --dtype) matmul rate measured in this process before and after the steps.

Prints per model: s/step and images/s (median, min-max), model GFLOP/s, % of the matmul peak,
and last the ratio ours / diffusers in throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, matmul_peak, perturbed, step_flops, summary, sync  # noqa: E402
from dit.config import OptimConfig  # noqa: E402
from dit.diffusion import create_diffusion  # noqa: E402
from dit.models import DiT_models, model_arch  # noqa: E402
from dit.distributed import DistEnv  # noqa: E402
from dit.train import EMA, build_optimizer, train_step  # noqa: E402
from dit.train.faults import NonFiniteGuard  # noqa: E402
from dit.train.randomness import RandomnessSpec, step_randomness  # noqa: E402
from dit.train.step import StepInputs, StepSetup  # noqa: E402


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our call signature `model(x, t, y) -> tensor`."""

    def __init__(self, name: str, input_size: int, in_channels: int = 4, num_classes: int = 1000):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        arch = model_arch(name)
        self.net = DiTTransformer2DModel(
            num_attention_heads=arch["num_heads"], attention_head_dim=arch["hidden_size"] // arch["num_heads"],
            in_channels=in_channels, out_channels=2 * in_channels, num_layers=arch["depth"],
            sample_size=input_size, patch_size=arch["patch_size"], num_embeds_ada_norm=num_classes,
        )

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y).sample


class ReferenceEMA:
    """The EMA as the reference training script writes it: a loop over named parameters."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.data, alpha=1 - self.decay)


class Step:
    """One optimizer step of `model`: the project's `train_step` ("ours") or the reference recipe
    (the baseline, written out here as the reference script does it)."""

    def __init__(self, model: nn.Module, recipe: str, device: torch.device, batch: tuple, dtype: torch.dtype):
        self.model, self.recipe, self.device, self.dtype = model, recipe, device, dtype
        self.x, self.y = batch
        self.diffusion = create_diffusion("")
        self.generator = torch.Generator(device).manual_seed(0)
        self.step = 0
        if recipe == "ours":
            self.opt = build_optimizer(model.parameters(), OptimConfig(), device)
            self.ema = EMA(model, 0.9999)
            self.guard = NonFiniteGuard(10, DistEnv(0, 0, 1, device), watch_signals=True)  # the trainer's default
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
            self.ema = ReferenceEMA(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if recipe == "ours":
            self.randomness = RandomnessSpec(0, len(self.x), tuple(self.x.shape[1:]), self.diffusion.num_timesteps, 0.1)
            self.setup = StepSetup(model, self.diffusion, self.opt, self.ema, num_classes=1000, params=self.params,
                                   update_if=self.guard.update_if,
                                   autocast_dtype=None if dtype == torch.float32 else dtype)

    def __call__(self) -> torch.Tensor:
        if self.recipe == "ours":
            r = step_randomness(self.randomness, self.step, 0, 1, self.device)
            self.step += 1
            loss, _ = train_step(self.setup, StepInputs(self.x, self.y, r, step=self.step))
            return loss
        t = torch.randint(0, 1000, (self.x.shape[0],), device=self.device, generator=self.generator)
        noise = torch.randn(self.x.shape, device=self.device, generator=self.generator)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            loss = self.diffusion.training_losses(self.model, self.x, t, {"y": self.y}, noise=noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        return loss.detach()


VARIANTS = {  # label: (model, recipe, tuned host allocator)
    "ours": ("ours", "ours", True),
    "diffusers": ("diffusers", "reference", False),
    "reference": ("ours", "reference", False),
}
EXTRA_VARIANTS = {
    "diffusers+ours": ("diffusers", "ours", True),
    "ours, default malloc": ("ours", "ours", False),
}
COMPILE_VARIANT = {"ours+compile": ("ours+compile", "ours", True)}


def build(kind: str, name: str, size: int) -> nn.Module:
    if kind == "diffusers":
        return DiffusersDiT(name, size)
    model = DiT_models[name](input_size=size, num_classes=1000)
    if kind == "ours+compile":
        model.compile()  # in place, as train.py compile=true does
    return model


def example_batch(args, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)
    return x.to(device), y.to(device)


def worker(conn, name: str, kind: str, recipe: str, tuned: bool, args) -> None:
    """One variant in its own process: build it, then run a step whenever the parent asks."""
    if tuned:
        from dit.cli.runtime import tune_host_allocator

        tune_host_allocator()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = perturbed(build(kind, name, args.input_size).to(device).train())
    step = Step(model, recipe, device, example_batch(args, device), getattr(torch, args.dtype))
    conn.send(sum(p.numel() for p in model.parameters()))
    while conn.recv() == "step":
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        conn.send((time.perf_counter() - start, loss.item()))


def bench_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    variants = dict(VARIANTS, **(EXTRA_VARIANTS if args.extra else {}), **(COMPILE_VARIANT if args.compile else {}))
    torch.manual_seed(0)
    x, y = example_batch(args, device)
    flops = step_flops(build("ours", name, args.input_size).to(device), x, y)

    ctx = mp.get_context("spawn")
    workers, params = {}, {}
    for label, (kind, recipe, tuned) in variants.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, name, kind, recipe, tuned, args), daemon=True)
        proc.start()
        workers[label] = (proc, parent)
    for label, (_, conn) in workers.items():
        params[label] = conn.recv()

    peak_dtype = dtype if device.type == "cuda" else torch.float32
    peak_before = matmul_peak(device, peak_dtype)
    times = {k: [] for k in variants}
    try:
        for r in range(args.warmup + args.repeats):
            for label, (_, conn) in workers.items():
                conn.send("step")
                seconds, loss = conn.recv()
                tag = " (warm-up)" if r < args.warmup else ""
                print(f"  {name} rep {r}{tag} {label:>20}: {seconds:.3f} s  loss {loss:.4f}", flush=True)
                if r >= args.warmup:
                    times[label].append(seconds)
    finally:
        for proc, conn in workers.values():
            conn.send("quit")
            proc.join(timeout=30)
    peak_after = matmul_peak(device, peak_dtype)
    peak = statistics.median([peak_before, peak_after])

    rows = {}
    for label, ts in times.items():
        s = summary(ts)
        rows[label] = {
            "params": params[label], "s_per_step": s,
            "images_per_s": args.batch_size / s["median"],
            "model_gflops_per_s": flops / s["median"] / 1e9,
            "percent_of_matmul_peak": 100 * flops / s["median"] / peak,
        }
    return {
        "model": name, "flops_per_step": flops, "matmul_peak_gflops": [peak_before / 1e9, peak_after / 1e9],
        "variants": rows,
        "ratio_ours_over_diffusers": rows["ours"]["images_per_s"] / rows["diffusers"]["images_per_s"],
        "ratio_ours_over_reference": rows["ours"]["images_per_s"] / rows["reference"]["images_per_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/4"])
    p.add_argument("--input-size", type=int, default=32, help="latent side (32: 256x256 images)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--extra", action="store_true",
                   help="also time diffusers' model with our step, and our step with glibc's default allocator")
    p.add_argument("--compile", action="store_true",
                   help="also time our step with model.compile() (train.py compile=true); compiles during warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    machine = machine_info(device)
    print("machine:", json.dumps(machine))
    print("args:", json.dumps(vars(args)), flush=True)
    results = [bench_model(name, args, device, dtype) for name in args.models]
    machine["load_average_at_end"] = machine_info(device)["load_average"]

    print(f"\n# {machine['date']} {machine['cpu']} x{machine['cpu_count']}, {machine['torch_threads']} threads, "
          f"torch {machine['torch']}, {machine['device']}, {args.dtype}, batch {args.batch_size}, "
          f"load {machine['load_average']:.1f} -> {machine['load_average_at_end']:.1f}")
    print(f"{'model':<10}{'variant':<22}{'params':>12}{'s/step':>9}{'min-max':>15}{'img/s':>8}"
          f"{'GFLOP/s':>9}{'% peak':>8}")
    for r in results:
        peak = statistics.median(r["matmul_peak_gflops"])
        for label, v in r["variants"].items():
            s = v["s_per_step"]
            print(f"{r['model']:<10}{label:<22}{v['params']:>12,}{s['median']:>9.3f}"
                  f"{s['min']:>7.3f}-{s['max']:<7.3f}{v['images_per_s']:>8.2f}{v['model_gflops_per_s']:>9.1f}"
                  f"{v['percent_of_matmul_peak']:>7.1f}%")
        print(f"{'':<10}{r['flops_per_step'] / 1e9:.1f} GFLOP per step; matmul peak {peak:.1f} GFLOP/s "
              f"(before {r['matmul_peak_gflops'][0]:.1f}, after {r['matmul_peak_gflops'][1]:.1f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))
    for r in results:
        print(f"{r['model']}: ours / reference-style {r['ratio_ours_over_reference']:.3f}x; "
              f"ours / diffusers {r['ratio_ours_over_diffusers']:.3f}x")


if __name__ == "__main__":
    main()
