"""Peak memory of one DiT training step with and without activation (gradient) checkpointing,
each variant measured in a fresh subprocess.

    python benchmarks/bench_memory.py --threads 1                       # CPU default: DiT-S/2, 4x32x32, batch 8, fp32; ~1-2 min on 2 cores
    python benchmarks/bench_memory.py --threads 1 --json benchmarks/results/memory_cpu.json | tee benchmarks/results/memory_cpu.txt
    python benchmarks/bench_memory.py --device cuda --model DiT-XL/2 --batch-size 32 --precision bf16

The step is the project's training step, `dit.train.step.train_step`: DiT's hybrid loss
(`create_diffusion("").training_losses`, MSE on epsilon + the variational bound on the learned
variance), backward, AdamW step, EMA update (`dit.train.EMA`, one `torch._foreach_lerp_`).
Label dropout is drawn by the step itself, as training does. The weights are the paper's
initialisation plus N(0, 0.02) noise, so that no branch is zero (adaLN-Zero would otherwise
give zero gradients to every attention and MLP weight).

For each variant (`model.gradient_checkpointing` False, then True) the script re-invokes itself
with a hidden `--_child` flag; the child does `--warmup` untimed steps (so gradients, AdamW's
two moments and the EMA copy exist, and lazily created kernels/caches are in place), then
`--repeats` measured steps. For each measured step:

  baseline   = memory held right before the step: parameters, gradients, AdamW state, EMA
               (+ on CPU the whole process: interpreter, libraries; the tensors alone are
               printed as "tensors"),
  peak       = the highest memory during the step,
  activation = peak - baseline.

Gradients are zeroed in place (`zero_grad(set_to_none=False)`), so they stay allocated and are
part of the baseline; with `set_to_none=True` they would be freed at the start of the step and
the activation figure would come out one gradient-copy too small.

CPU: memory is the resident set size. Before each step the child runs `gc.collect()` and glibc's
`malloc_trim(0)` (through ctypes), reads VmRSS from /proc/self/status as the baseline, then
resets the high-water mark by writing "5" to /proc/self/clear_refs (Linux >= 4.0; VmHWM becomes
the current RSS) and reads VmHWM after the step. If clear_refs is not writable it falls back to
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which cannot be reset: the peak is then the
process's lifetime maximum (warm-up included) and is reported as such ("method" in the output).
Allocator choice: glibc keeps freed heap memory mapped and, by default, raises its mmap threshold
dynamically (up to 32 MiB) once large blocks have been freed, so after a warm-up step most
activation-sized blocks would come from a heap that never shrinks: the baseline would include
the previous step's freed activations and the next step would reuse them without raising the
RSS (activation memory under-reported). The child is therefore started with
MALLOC_MMAP_THRESHOLD_=65536 (a fixed threshold, which also switches the dynamic one off: every
block >= 64 KiB is its own mmap and goes back to the kernel when freed) and
MALLOC_TRIM_THRESHOLD_=131072, plus the malloc_trim call above. `--malloc default` leaves glibc
as it is, for comparison (DiT-S/2 defaults, 1 thread: with glibc's defaults the RSS after a
step stays near the step's peak, and the fragmented heap inflates the activation figures, plain
877 and checkpointed 291 MiB instead of 741 and 111). PyTorch's CPU allocator does not cache.
CUDA: torch.cuda.memory_allocated() before the step, torch.cuda.reset_peak_memory_stats(), and
torch.cuda.max_memory_allocated() after it (tensors only; the caching allocator's reserve and
the CUDA context are not counted).

Sanity check (in the parent, after the children): one step's loss and gradients with the same
weights and inputs, checkpointing off then on, compared elementwise (target: max relative
difference <= 1e-6); and the losses of the children's steps compared step by step.

Flags: --model, --input-size (latent side), --in-channels, --batch-size, --precision (fp32 |
bf16 autocast), --device, --threads (torch CPU threads), --warmup, --repeats, --malloc, --seed,
--json (also write the results to this file).
Prints baseline / peak / activation (MiB, median of the repeats, min-max) for both variants and
the ratio activation(checkpointed) / activation(plain) last (goal: <= 0.33).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, perturbed, summary  # noqa: E402

from dit.config import OptimConfig  # noqa: E402
from dit.data import item_seed  # noqa: E402
from dit.diffusion import create_diffusion  # noqa: E402
from dit.models import DiT_models, canonical_model_name  # noqa: E402
from dit.train import EMA, build_optimizer, train_step  # noqa: E402
from dit.train.randomness import RandomnessSpec, step_randomness  # noqa: E402
from dit.train.step import StepInputs, StepSetup, take_over_label_dropout  # noqa: E402

MIB = 2.0 ** 20
VARIANTS = (("plain", False), ("checkpointed", True))
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
_INPUT_STREAM = 1 << 61  # item_seed stream of the benchmark's synthetic batches


# --------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------


def _status_kib(*keys: str) -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])  # "12345 kB"
    return out


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class CpuProbe:
    """RSS of this process: baseline before, high-water mark after."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after writing 5 to /proc/self/clear_refs (peak reset before each step)"
            self.resettable = True
        except OSError:
            self.method = ("resource.getrusage ru_maxrss (clear_refs not writable: peak NOT reset, "
                           "it is the process's lifetime maximum, warm-up included)")
            self.resettable = False

    def before(self) -> float:
        gc.collect()
        _malloc_trim()
        base = _status_kib("VmRSS")["VmRSS"] * 1024
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return base

    def peak(self) -> float:
        if self.resettable:
            return _status_kib("VmHWM")["VmHWM"] * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    def now(self) -> float:
        return _status_kib("VmRSS")["VmRSS"] * 1024


class CudaProbe:
    method = "torch.cuda.memory_allocated before, max_memory_allocated after reset_peak_memory_stats"

    def before(self) -> float:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self) -> float:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def now(self) -> float:
        return torch.cuda.memory_allocated()


# --------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------


def build_model(args, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels, num_classes=1000)
    perturbed(model, seed=args.seed + 1)  # every branch live: see the module docstring
    take_over_label_dropout(model)  # the step draws the label-dropout mask itself
    return model.to(device).train()


def make_batch(args, step: int, device: torch.device, num_timesteps: int) -> dict:
    """The synthetic batch of step `step` (the same in every process): latents and labels, and the
    step's randomness (timesteps, noise, label-dropout mask) drawn as training draws it."""
    g = torch.Generator().manual_seed(item_seed(args.seed, step, _INPUT_STREAM))
    shape = (args.in_channels, args.input_size, args.input_size)
    batch = {
        "x0": torch.randn((args.batch_size, *shape), generator=g).to(device),
        "y": torch.randint(0, 1000, (args.batch_size,), generator=g).to(device),
    }
    spec = RandomnessSpec(args.seed, args.batch_size, shape, num_timesteps, 0.1)
    batch["r"] = step_randomness(spec, step, 0, 1, device)
    return batch


def run_step(model, diffusion, opt, ema, batch: dict, precision: str, update: bool = True) -> torch.Tensor:
    """The project's step on `batch`; `update=False` stops after the backward pass (gradients kept)."""
    params = [p for p in model.parameters() if p.requires_grad]
    setup = StepSetup(model, diffusion, opt, ema, num_classes=1000, params=params,
                      autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
                      update_if=None if update else (lambda loss, grad_norm: False))
    loss, _ = train_step(setup, StepInputs(batch["x0"], batch["y"], batch["r"]))
    return loss


def tensor_state_bytes(model, opt, ema) -> dict:
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    params = list(model.parameters())
    return {
        "params": nbytes(params),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "adamw_state": nbytes(v for s in opt.state.values() for v in s.values()),
        "ema": nbytes(ema.module.parameters()),
    }


def child(args) -> None:
    """One variant in this fresh process; writes its measurements to args._out."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probe = CudaProbe() if device.type == "cuda" else CpuProbe()
    diffusion = create_diffusion("")
    model = build_model(args, device)
    model.gradient_checkpointing = dict(VARIANTS)[args._child]
    ema = EMA(model, 0.9999)
    opt = build_optimizer(model.parameters(), OptimConfig(), device)
    batches = [make_batch(args, i, device, diffusion.num_timesteps) for i in range(args.warmup + args.repeats)]

    def step(batch) -> torch.Tensor:
        # The previous step's gradients are held until the step frees them (zero_grad(set_to_none))
        # right before its backward pass: they belong to the baseline.
        return run_step(model, diffusion, opt, ema, batch, args.precision)

    losses, base, peak, after = [], [], [], []
    for i, batch in enumerate(batches):
        measured = i >= args.warmup
        if measured:
            base.append(probe.before())
        loss = step(batch)
        if measured:
            peak.append(probe.peak())
            after.append(probe.now())
        losses.append(float(loss))
    state = tensor_state_bytes(model, opt, ema)
    out = {
        "variant": args._child, "gradient_checkpointing": model.gradient_checkpointing,
        "method": probe.method, "losses": losses,
        "baseline_mib": [b / MIB for b in base], "peak_mib": [p / MIB for p in peak],
        "activation_mib": [(p - b) / MIB for p, b in zip(peak, base)],
        "after_step_mib": [a / MIB for a in after],
        "tensor_state_mib": {k: v / MIB for k, v in state.items()},
        "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
        "torch_threads": torch.get_num_threads(),
    }
    Path(args._out).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------
# Parent: run the variants, check the gradients, report
# --------------------------------------------------------------------------------------


def run_variant(args, name: str, tmp: Path) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, "--_out", str(out)]
    for flag in ("model", "input_size", "in_channels", "batch_size", "precision", "device", "threads",
                 "warmup", "repeats", "seed"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ)
    if args.malloc == "tight":
        env.update(MALLOC_ENV)
    else:
        for k in MALLOC_ENV:
            env.pop(k, None)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def gradient_check(args) -> dict:
    """Loss and gradients of one step, same weights and inputs, checkpointing off then on."""
    device = torch.device(args.device)
    diffusion = create_diffusion("")
    model = build_model(args, device)
    batch = make_batch(args, 0, device, diffusion.num_timesteps)
    opt = build_optimizer(model.parameters(), OptimConfig(), device)
    results = {}
    for name, flag in VARIANTS:
        model.gradient_checkpointing = flag
        loss = run_step(model, diffusion, opt, None, batch, args.precision, update=False)
        results[name] = (float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    (l0, g0), (l1, g1) = results["plain"], results["checkpointed"]
    max_abs, max_rel, worst = 0.0, 0.0, None
    for n, a in g0.items():
        b = g1[n]
        diff = (a.double() - b.double()).abs().max().item()
        rel = diff / max(a.double().abs().max().item(), 1e-30)
        max_abs = max(max_abs, diff)
        if rel > max_rel:
            max_rel, worst = rel, n
    nonzero = sum(bool(g.abs().max() > 0) for g in g0.values())
    return {
        "loss_plain": l0, "loss_checkpointed": l1, "loss_abs_diff": abs(l0 - l1),
        "grad_tensors": len(g0), "grad_tensors_nonzero": nonzero, "same_keys": g0.keys() == g1.keys(),
        "grad_max_abs_diff": max_abs, "grad_max_rel_diff": max_rel, "worst_tensor": worst,
        "ok": g0.keys() == g1.keys() and max_rel <= 1e-6 and abs(l0 - l1) <= 1e-6 * max(1.0, abs(l0)),
    }



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32: 256x256 images with a KL-f8 VAE)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: torch.autocast, as training")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on an oversubscribed machine")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured ones (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="measured steps per variant")
    p.add_argument("--malloc", default="tight", choices=["tight", "default"],
                   help="tight: the children get MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ (see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = canonical_model_name(args.model)
    if args.warmup < 1:
        p.error("--warmup must be >= 1: the baseline needs gradients and AdamW state allocated")
    if args._child:
        child(args)
        return

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device, kernel=platform.release())
    print("machine:", json.dumps(machine))
    print("args:", json.dumps(vars(args)))

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, _ in VARIANTS:
            print(f"measuring {name} in a fresh process ...", flush=True)
            runs[name] = run_variant(args, name, Path(tmp))
    print("gradient check (one step, same weights and inputs, in this process) ...", flush=True)
    check = gradient_check(args)
    traj = [abs(a - b) for a, b in zip(runs["plain"]["losses"], runs["checkpointed"]["losses"])]
    machine["load_average_at_end"] = os.getloadavg()[0]

    stats = {name: {k: summary(r[k]) for k in ("baseline_mib", "peak_mib", "activation_mib", "after_step_mib")}
             for name, r in runs.items()}
    ratio = stats["checkpointed"]["activation_mib"]["median"] / stats["plain"]["activation_mib"]["median"]
    results = {
        "machine": machine, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "method": runs["plain"]["method"], "malloc_env": runs["plain"]["malloc_env"],
        "variants": {name: {**runs[name], "summary": stats[name]} for name in runs},
        "gradient_check": check, "step_loss_max_abs_diff_between_runs": max(traj),
        "ratio_activation_checkpointed_over_plain": ratio,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))

    unit = "RSS" if args.device == "cpu" else "allocated"
    state = runs["plain"]["tensor_state_mib"]
    print(f"# {machine['host']} {machine['cpu']}, torch {machine['torch']}, {machine['torch_threads']} thread(s), "
          f"device {machine['device']}, {machine['date']}; load average {machine['load_average']:.1f} / "
          f"{machine['load_average_at_end']:.1f} on {machine['cpu_count']} cores")
    print(f"# {args.model}, {args.in_channels}x{args.input_size}x{args.input_size} latents, batch {args.batch_size}, "
          f"{args.precision}; step = hybrid loss + backward + AdamW + EMA; {args.warmup} warm-up, "
          f"{args.repeats} measured steps per variant, each variant in a fresh process")
    print(f"# method: {results['method']}; malloc env: {results['malloc_env'] or 'glibc defaults'}")
    print(f"# tensors held between steps: params {state['params']:.1f} + grads {state['grads']:.1f} + "
          f"AdamW {state['adamw_state']:.1f} + EMA {state['ema']:.1f} = {sum(state.values()):.1f} MiB")
    print(f"{'variant':<14}{'baseline ' + unit + ' MiB':>26}{'peak MiB':>26}{'activation MiB':>24}{'after step':>12}")
    for name in runs:
        s = stats[name]
        cells = [f"{s[k]['median']:.1f} ({s[k]['min']:.1f}-{s[k]['max']:.1f})"
                 for k in ("baseline_mib", "peak_mib", "activation_mib")]
        print(f"{name:<14}{cells[0]:>26}{cells[1]:>26}{cells[2]:>24}{s['after_step_mib']['median']:>12.1f}")
    print(f"sanity: loss plain {check['loss_plain']:.8f}, checkpointed {check['loss_checkpointed']:.8f} "
          f"(|diff| {check['loss_abs_diff']:.2e}); gradients of {check['grad_tensors']} tensors "
          f"({check['grad_tensors_nonzero']} nonzero): max abs diff {check['grad_max_abs_diff']:.2e}, "
          f"max rel diff {check['grad_max_rel_diff']:.2e} -> {'OK (<= 1e-6)' if check['ok'] else 'MISMATCH'}; "
          f"losses of the {len(traj)} steps of the two runs differ by at most {max(traj):.2e}")
    print(f"ratio activation checkpointed / plain: {ratio:.3f} (goal <= 0.33)")


if __name__ == "__main__":
    main()
