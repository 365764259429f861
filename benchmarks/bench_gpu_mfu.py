"""GPU training efficiency of DiT: MFU (model FLOP/s over the card's bf16 matmul peak measured in
the same run) and peak memory, with activation checkpointing off and on.

    python benchmarks/bench_gpu_mfu.py                                   # GPU default: DiT-XL/2, 4x32x32, batch 256, bf16, compiled
    python benchmarks/bench_gpu_mfu.py --batch-size 128 --steps 30 --json benchmarks/results/gpu_mfu_h200.json
    python benchmarks/bench_gpu_mfu.py --model DiT-S/8 --input-size 8 --batch-size 2 --steps 2 --warmup 1 \\
        --device cpu --dtype float32 --no-compile --threads 1          # CPU smoke test of the code path (not a measurement)

1. Peak: `--peak-size`^3 square matmuls (default 8192 on CUDA) in the training dtype, `--peak-iters`
   back to back per timing, `--peak-repeats` timings after a warm-up; the median is the peak
   (TFLOP/s, 2 n^3 per matmul). It is usually below the datasheet number, which is printed for
   reference when the card is known (dense bf16, no sparsity).
2. FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one real forward (hybrid loss) and,
   separately, its backward, on an eager copy of the model at `--flop-batch` images, divided by the
   batch: matmul, convolution and attention FLOPs as executed (the backward is counted, not assumed
   to be 2x the forward). "Model FLOPs" are counted with checkpointing off; with it on the count
   also includes the recomputed forward of the blocks, reported as hardware FLOPs (HFU). MFU uses
   model FLOPs for both variants. On CUDA the count runs under the same SDPA backend as training;
   on CPU under the math backend (the counter has no formula for the CPU flash kernel, the math
   path's bmm's count the same FLOPs). A closed-form count (3x the forward's matmul FLOPs) is
   printed as a cross-check.
3. Training step: the project's own `dit.train.step.train_step`, as the trainer calls it: `DiT_models[--model]`, label dropout,
   `create_diffusion("").training_losses` (hybrid loss), forward under
   `torch.autocast(bfloat16)` (fp32 weights), backward, fused AdamW (CUDA), EMA update
   (`dit.train.EMA`: one `torch._foreach_lerp_`), with `model.compile()` in place (optional).
   On CUDA forward and backward run under `torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`
   (a missing flash kernel is an error, not a silent fallback; the backward is included so the
   checkpointed blocks' recompute uses flash too). Synthetic N(0, 1) latents and random labels,
   already on the device (no data loading). Each step is timed between two
   `torch.cuda.synchronize()`; `--warmup` steps (compilation, autotuning) are excluded; peak memory
   is `torch.cuda.max_memory_allocated()` over the timed steps (reset after the warm-up).
   The two variants run one after the other in this process; between them everything is freed
   and `torch._dynamo.reset()` is called (the allocated memory at the start of each is printed).
   An out-of-memory variant is reported as such and the other still runs.

Flags: --model, --input-size (latent side), --in-channels, --num-classes, --batch-size (per GPU),
--steps (timed), --warmup, --device, --dtype (bfloat16: autocast; float32: none), --compile /
--no-compile, --compile-mode, --attention (flash | efficient | cudnn | math | default), --fused /
--no-fused (AdamW), --variants (off,on), --flop-batch, --peak-size, --peak-iters, --peak-repeats,
--datasheet-tflops, --threads, --seed, --json (also write the results to this file).
Prints, per variant: images/s and step time (median, min-max), achieved model TFLOP/s, MFU, peak
memory; and the MFU (achieved / measured peak) of both variants last (goal >= 55 % on H100/H200,
checkpointing off).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, summary, sync  # noqa: E402

from dit.diffusion import create_diffusion  # noqa: E402
from dit.models import DiT_models, canonical_model_name, model_arch  # noqa: E402
from dit.config import OptimConfig  # noqa: E402
from dit.train import EMA, build_optimizer, train_step  # noqa: E402
from dit.train.randomness import RandomnessSpec, step_randomness  # noqa: E402
from dit.train.step import StepInputs, StepSetup, take_over_label_dropout  # noqa: E402

GIB = 2.0 ** 30
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; first match wins.
DATASHEET_BF16 = (("H200 NVL", None), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", None),
                  ("H100", 989.4), ("A100", 312.0))




# --------------------------------------------------------------------------------------
# 1. The card's matmul peak
# --------------------------------------------------------------------------------------


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, iters: int, repeats: int) -> dict:
    """TFLOP/s of back-to-back (n x n) @ (n x n) matmuls into a preallocated output."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(max(3, iters // 4)):  # warm-up: cuBLAS heuristics, clocks
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        sync(device)
        rates.append(2.0 * n ** 3 * iters / (time.perf_counter() - start) / 1e12)
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"size": n, "dtype": str(dtype).removeprefix("torch."), "iters": iters, **summary(rates), "all": rates}


# --------------------------------------------------------------------------------------
# 2. FLOPs per image
# --------------------------------------------------------------------------------------


def analytic_train_flops(name: str, input_size: int, in_channels: int) -> float:
    """3 x the forward's matmul FLOPs per image (2 per multiply-add): patch embedding, timestep
    MLP, per block adaLN (per image) + qkv, attention (QK^T, AV), projection, MLP, final layer."""
    a = model_arch(name)
    d, depth, p = a["hidden_size"], a["depth"], a["patch_size"]
    tokens = (input_size // p) ** 2
    fwd = 2 * tokens * in_channels * p * p * d  # patch embedding (conv as a linear map)
    fwd += 2 * (256 * d + d * d)  # timestep MLP
    per_block = 2 * d * 6 * d + 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + 2 * tokens * d * d \
        + 2 * 2 * tokens * d * 4 * d
    fwd += depth * per_block
    fwd += 2 * d * 2 * d + 2 * tokens * d * p * p * 2 * in_channels  # final adaLN + linear (learned sigma)
    return 3.0 * fwd


def count_flops(args, device, amp_dtype, attention_ctx, checkpointing: bool) -> dict:
    """Forward and backward FLOPs per image of one real step on an eager copy of the model."""
    model = build_model(args, device, checkpointing)
    diffusion = create_diffusion("")
    x0, y = synthetic_batch(args, device, args.flop_batch, 0)
    t = torch.randint(0, diffusion.num_timesteps, (args.flop_batch,), device=device)
    with attention_ctx():
        with FlopCounterMode(display=False) as fwd:
            with amp(device, amp_dtype):
                loss = diffusion.training_losses(model, x0, t, model_kwargs={"y": y})["loss"].mean()
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    ops = sorted({str(op) for counter in (fwd, bwd) for op in counter.get_flop_counts().get("Global", {})})
    del model
    return {"forward": fwd.get_total_flops() / args.flop_batch, "backward": bwd.get_total_flops() / args.flop_batch,
            "total": (fwd.get_total_flops() + bwd.get_total_flops()) / args.flop_batch, "ops": ops}


# --------------------------------------------------------------------------------------
# 3. The training step
# --------------------------------------------------------------------------------------


def amp(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def build_model(args, device: torch.device, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels,
                                   num_classes=args.num_classes).to(device).train()
    model.gradient_checkpointing = checkpointing
    if not all(getattr(block.attn, "fused_attn", False) for block in model.blocks):
        raise SystemExit("timm's Attention is not calling F.scaled_dot_product_attention (TIMM_FUSED_ATTN=0?): "
                         "the SDPA backend would not apply")
    return model


def synthetic_batch(args, device, batch_size: int, index: int):
    g = torch.Generator(device=device).manual_seed(args.seed + 1000 + index)
    x0 = torch.randn((batch_size, args.in_channels, args.input_size, args.input_size), device=device, generator=g)
    y = torch.randint(0, args.num_classes, (batch_size,), device=device, generator=g)
    return x0, y


def run_variant(args, device, amp_dtype, attention_ctx, checkpointing: bool) -> dict:
    start_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    model = build_model(args, device, checkpointing)
    ema = EMA(model, 0.9999)  # before compiling: a deep copy of the plain module
    opt = build_optimizer(model.parameters(), OptimConfig(fused=args.fused), device)
    drop_prob = take_over_label_dropout(model)  # the step draws the label-dropout mask itself
    params = [p for p in model.parameters() if p.requires_grad]
    if args.compile:
        model.compile(mode=args.compile_mode)  # in place, as the trainer does
    diffusion = create_diffusion("")
    batches = [synthetic_batch(args, device, args.batch_size, i) for i in range(2)]
    x_first = batches[0][0]
    spec = RandomnessSpec(args.seed, len(x_first), tuple(x_first.shape[1:]), diffusion.num_timesteps, drop_prob)
    setup = StepSetup(model, diffusion, opt, ema, num_classes=args.num_classes, params=params, autocast_dtype=amp_dtype)

    def step(i: int) -> torch.Tensor:
        x0, y = batches[i % len(batches)]
        r = step_randomness(spec, i, 0, 1, device)
        with attention_ctx():
            loss, _ = train_step(setup, StepInputs(x0, y, r))
        return loss

    out = {"gradient_checkpointing": checkpointing, "start_allocated_gib": None if start_allocated is None
           else start_allocated / GIB}
    try:
        warm = []
        for i in range(args.warmup):
            sync(device)
            t0 = time.perf_counter()
            step(i)
            sync(device)
            warm.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            out["before_timed_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        times, losses = [], []
        for i in range(args.warmup, args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            losses.append(step(i))
            sync(device)
            times.append(time.perf_counter() - t0)
        losses = [float(v) for v in losses]
        out.update({
            "oom": False, "warmup_s": warm, "step_s": summary(times), "step_s_all": times,
            "images_per_s": summary([args.batch_size / s for s in times]), "losses": losses,
            "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
        })
        if device.type == "cuda":
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    except torch.OutOfMemoryError as err:
        out.update({"oom": True, "error": str(err).splitlines()[0]})
    finally:
        del model, ema, opt, batches
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32: 256x256 images with a KL-f8 VAE)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="per GPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="bfloat16: autocast around forward and loss, fp32 weights; float32: no autocast")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="model.compile() in place")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--attention", default=None, choices=[*BACKENDS, "default"],
                   help="SDPA backend enforced around forward and backward (default: flash on CUDA, "
                        "torch's choice on CPU)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused AdamW (default: on for CUDA)")
    p.add_argument("--variants", default="off,on", help="gradient checkpointing variants to run: off, on or off,on")
    p.add_argument("--flop-batch", type=int, default=2, help="images in the FLOP-counting pass")
    p.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (default 8192 CUDA, 512 CPU)")
    p.add_argument("--peak-iters", type=int, default=None, help="matmuls per timing (default 50 CUDA, 3 CPU)")
    p.add_argument("--peak-repeats", type=int, default=7)
    p.add_argument("--datasheet-tflops", type=float, default=None,
                   help="the card's datasheet dense peak, for reference only (default: from a small table)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on an oversubscribed machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    args.model = canonical_model_name(args.model)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"off", "on"}:
        p.error("--variants must be off, on or off,on")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    if args.fused is None:
        args.fused = cuda
    if args.attention is None:
        args.attention = "flash" if cuda else "default"
    if args.peak_size is None:
        args.peak_size = 8192 if cuda else 512
    if args.peak_iters is None:
        args.peak_iters = 50 if cuda else 3

    def attention_ctx():
        return sdpa_kernel(BACKENDS[args.attention]) if args.attention != "default" else nullcontext()

    def counting_ctx():  # the FLOP counter has formulas for the CUDA SDPA kernels only
        return attention_ctx() if cuda else sdpa_kernel(SDPBackend.MATH)

    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    datasheet = args.datasheet_tflops
    if datasheet is None and cuda and args.dtype == "bfloat16":
        datasheet = next((v for key, v in DATASHEET_BF16 if key in device_name), None)
    machine = machine_info(device, cuda=torch.version.cuda,
                           capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None)
    print("machine:", json.dumps(machine))
    print("args:", json.dumps(vars(args)))
    if not cuda:
        print("NOTE: not on CUDA: a smoke test of the code path, not a measurement of anything")

    print("measuring the matmul peak ...", flush=True)
    peak = matmul_peak(args.peak_size, amp_dtype or torch.float32, device, args.peak_iters, args.peak_repeats)
    print("counting FLOPs ...", flush=True)
    flops = {"off": count_flops(args, device, amp_dtype, counting_ctx, False)}
    if "on" in variants:
        flops["on"] = count_flops(args, device, amp_dtype, counting_ctx, True)
    model_flops = flops["off"]["total"]
    analytic = analytic_train_flops(args.model, args.input_size, args.in_channels)

    runs = {}
    for v in variants:
        print(f"training, gradient checkpointing {v} ...", flush=True)
        runs[v] = r = run_variant(args, device, amp_dtype, attention_ctx, v == "on")
        if not r["oom"]:
            ips = r["images_per_s"]["median"]
            r["model_tflops_per_s"] = model_flops * ips / 1e12
            r["mfu"] = r["model_tflops_per_s"] / peak["median"]
            r["hardware_tflops_per_s"] = flops[v]["total"] * ips / 1e12
            r["hfu"] = r["hardware_tflops_per_s"] / peak["median"]
    machine["load_average_at_end"] = os.getloadavg()[0]

    results = {"machine": machine, "args": vars(args), "smoke_test_not_a_measurement": not cuda,
               "matmul_peak_tflops": peak, "datasheet_tflops": datasheet,
               "flops_per_image": flops, "analytic_flops_per_image": analytic, "variants": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))

    print(f"# {machine['host']}, {device_name}, torch {machine['torch']} (CUDA {machine['cuda']}), "
          f"{machine['torch_threads']} CPU thread(s), {machine['date']}")
    print(f"# {args.model}, {args.in_channels}x{args.input_size}x{args.input_size} latents, batch {args.batch_size}, "
          f"{args.dtype}{' autocast' if amp_dtype else ''}, compile {'on' if args.compile else 'off'}"
          f"{' (' + args.compile_mode + ')' if args.compile and args.compile_mode else ''}, attention {args.attention}, "
          f"{'fused ' if args.fused else ''}AdamW + EMA; {args.warmup} warm-up + {args.steps} timed steps per variant")
    ref = f"; datasheet {datasheet:.1f} (measured = {100 * peak['median'] / datasheet:.0f} % of it)" if datasheet else ""
    print(f"matmul peak ({peak['size']}^3, {peak['dtype']}): {peak['median']:.4g} TFLOP/s (median of {peak['n']}, "
          f"min {peak['min']:.4g}, max {peak['max']:.4g}){ref}")
    f0 = flops["off"]
    print(f"model FLOPs per image (FlopCounterMode, fwd + bwd as executed): {f0['total'] / 1e9:.2f} GFLOP "
          f"= fwd {f0['forward'] / 1e9:.2f} + bwd {f0['backward'] / 1e9:.2f} ({f0['backward'] / f0['forward']:.2f}x fwd); "
          f"closed form 3x fwd: {analytic / 1e9:.2f} ({100 * (f0['total'] / analytic - 1):+.1f} %)")
    if "on" in flops:
        print(f"with checkpointing (recompute included): {flops['on']['total'] / 1e9:.2f} GFLOP per image")
    print(f"counted ops: {', '.join(f0['ops'])}")
    print(f"{'checkpointing':<15}{'images/s':>28}{'step ms':>12}{'model TFLOP/s':>15}{'MFU':>8}{'HFU':>8}"
          f"{'peak alloc GiB':>16}{'start GiB':>11}")
    for v, r in runs.items():
        if r["oom"]:
            print(f"{v:<15}{'out of memory: ' + r['error'][:80]}")
            continue
        ips = r["images_per_s"]
        mem = f"{r['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in r else "n/a"
        start = f"{r['start_allocated_gib']:.2f}" if r["start_allocated_gib"] is not None else "n/a"
        cell = f"{ips['median']:.1f} ({ips['min']:.1f}-{ips['max']:.1f})"
        print(f"{v:<15}{cell:>28}{1000 * r['step_s']['median']:>12.1f}{r['model_tflops_per_s']:>15.4g}"
              f"{100 * r['mfu']:>7.1f}%{100 * r['hfu']:>7.1f}%{mem:>16}{start:>11}")
        if not r["losses_finite"]:
            print(f"  WARNING: non-finite loss in the timed steps: {r['losses']}")
    mfu = ", ".join(f"checkpointing {v} {100 * r['mfu']:.1f} %" for v, r in runs.items() if not r["oom"])
    tag = " [CPU SMOKE TEST, NOT A MEASUREMENT]" if not cuda else ""
    print(f"MFU (model FLOP/s / measured {peak['dtype']} matmul peak): {mfu or 'n/a'} "
          f"(goal >= 55 % on H100/H200){tag}")


if __name__ == "__main__":
    main()
