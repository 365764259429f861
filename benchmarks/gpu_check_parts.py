"""The parts of `benchmarks/gpu_check.sh` that no other benchmark script measures, and its summary.

    python benchmarks/gpu_check_parts.py sampling  --device cuda --json OUT.json      # DDPM-250 vs DPM++-10 vs MeanFlow-1
    python benchmarks/gpu_check_parts.py inception --device cuda --weights W.pth --json OUT.json   # FID fp32 vs TF32
    python benchmarks/gpu_check_parts.py two_procs --device cuda:0 --workdir DIR --json OUT.json  # 2 ranks on 1 GPU vs 1
    python benchmarks/gpu_check_parts.py summary   --out DIR --parts DIR/parts.tsv                # gpu_check.json

Each part writes one JSON file and exits 0 when it wrote its figures or a recorded reason why it
has none ("status": "skipped" for Inception without weights, "not_supported" for two ranks on one
GPU where NCCL refuses them); anything else is an error (exit 1). The figures are ratios against
a baseline measured in the same run; nothing here asserts a speed.

sampling: images/s of `dit.sampling.images.sample_latents` for DDPM-250 and DPM-Solver++-10 on a
  diffusion DiT (learned sigma, classifier-free guidance at --cfg-scale: 2 rows per image and
  evaluation) and the MeanFlow sampler with 1 step on a MeanFlow DiT of the same size
  (`time_inputs=2`, no learned sigma, cfg_scale 1: the paper's protocol, guidance trained in,
  1 row per image), random weights (initialisation + N(0, 0.02)), latents only (the VAE decode is
  the same for all), the network forward at --precision; the configurations alternate repetition
  by repetition after one short warm-up run each. A sample set that comes out non-finite (random
  weights) is timed all the same and marked.
inception: torch-fidelity's InceptionV3 (`dit.scoring.inception.InceptionFeatures`) with
  precision fp32 (the protocol) and tf32, on the same two sets of random block images; FID of the
  two sets under each precision, their difference, and the largest feature difference.
two_procs: `train.py` (the real trainer, toy data in pixel space) for --steps steps as 1 process
  and as 2 processes under torchrun, both ranks on the same --device (`device=cuda:0`, which the
  trainer takes as given for every rank; NCCL on CUDA, gloo on the CPU); steps/s and images/s
  from metrics.jsonl (median over the log windows after the first, which holds the start-up).
  NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): that is recorded as
  "not_supported" with the log's line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PART_ORDER = ("mfu", "memory", "two_procs", "sampling", "inception")
TINY_ARCH = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------
# sampling: DDPM-250 vs DPM++-10 vs MeanFlow-1
# --------------------------------------------------------------------------------------


def build_dit(name: str, input_size: int, device, seed: int, **config):
    """A DiT of the official size `name` (or `tiny`) with random weights moved off adaLN-Zero's
    zeros (every branch live), in eval mode on `device`."""
    import torch

    from dit.models import DiT, model_arch

    arch = TINY_ARCH if name == "tiny" else model_arch(name)
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, in_channels=4, num_classes=1000, **arch, **config).to(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))
    return model.eval()


def part_sampling(args) -> dict:
    import torch

    from common import machine_info, summary, sync
    from dit.diffusion import create_diffusion
    from dit.flow.config import flow_from_config
    from dit.sampling.images import NonFiniteSamplesError, sample_latents
    from dit.sampling.order import initial_noise, sample_generators
    from dit.sampling.settings import SamplerSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    diffusion_model = build_dit(args.model, args.input_size, device, args.seed)
    meanflow_model = build_dit(args.model, args.input_size, device, args.seed, learn_sigma=False, time_inputs=2)
    objectives = {"diffusion": create_diffusion(""), "meanflow": flow_from_config({"kind": "meanflow"})}
    configs = [  # label, model, objective, sampler, steps, cfg scale
        ("ddpm-250", diffusion_model, "diffusion", "ddpm", 250, args.cfg_scale),
        ("dpm++-10", diffusion_model, "diffusion", "dpm++", 10, args.cfg_scale),
        ("meanflow-1", meanflow_model, "meanflow", "meanflow", 1, 1.0),
    ]
    n = args.batch_size
    labels = torch.arange(n, device=device) % 1000
    noise = initial_noise(sample_generators(args.seed, range(n)), (4, args.input_size, args.input_size)).to(device)

    def run(model, objective, sampler, steps, cfg):
        settings = SamplerSettings(sampler=sampler, num_steps=steps, cfg_scale=cfg, precision=args.precision)
        counter: list = []
        ok = True
        sync(device)
        start = time.perf_counter()
        try:
            sample_latents(model, objectives[objective], labels, settings, noise=noise,
                           generator=sample_generators(args.seed, range(n)), denoiser_out=counter)
        except NonFiniteSamplesError:  # random weights: the time is still the sampler's
            ok = False
        sync(device)
        den = counter[0]
        return time.perf_counter() - start, den.calls, den.rows / n, ok

    for _, model, objective, sampler, steps, cfg in configs:  # warm-up: kernels, allocator, lazy imports
        run(model, objective, sampler, min(steps, 2), cfg)
    rates = {c[0]: [] for c in configs}
    info: dict = {}
    for _ in range(args.repeats):
        for label, model, objective, sampler, steps, cfg in configs:
            seconds, calls, rows, ok = run(model, objective, sampler, steps, cfg)
            rates[label].append(n / seconds)
            info[label] = {"sampler": sampler, "num_steps": steps, "cfg_scale": cfg, "nfe": calls,
                           "rows_per_image": rows, "finite": ok and info.get(label, {}).get("finite", True)}
    base = statistics.median(rates["ddpm-250"])
    out = {"status": "ok", "machine": machine_info(device), "smoke_test_not_a_measurement": device.type != "cuda",
           "args": vars(args), "configs": {}}
    for label in rates:
        med = statistics.median(rates[label])
        out["configs"][label] = {**info[label], "images_per_s": summary(rates[label]), "images_per_s_all": rates[label],
                                 "speedup_vs_ddpm250": med / base}
    print(f"# {out['machine']['device']}, {args.model} on 4x{args.input_size}x{args.input_size} latents, batch {n}, "
          f"forward {args.precision}, {args.repeats} repeats")
    for label, r in out["configs"].items():
        print(f"{label:<12} NFE {r['nfe']:>4}  rows/img {r['rows_per_image']:.0f}  "
              f"{r['images_per_s']['median']:10.3f} img/s  x{r['speedup_vs_ddpm250']:.1f} vs ddpm-250"
              f"{'' if r['finite'] else '  (non-finite samples: random weights)'}")
    return out


# --------------------------------------------------------------------------------------
# inception: FID with fp32 vs TF32 features
# --------------------------------------------------------------------------------------


def block_images(n: int, side: int, blocks: int, seed: int):
    """n uint8 (side, side, 3) images of random colour blocks on a blocks x blocks grid."""
    import numpy as np

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, blocks, blocks, 3), dtype=np.uint8)
    reps = -(-side // blocks)
    return np.repeat(np.repeat(small, reps, axis=1), reps, axis=2)[:, :side, :side]


def find_inception_weights(path: str | None) -> Path | None:
    from dit.scoring.inception import FeatureExtractorUnavailable, resolve_inception_weights

    try:
        return resolve_inception_weights(path or None, allow_download=False)
    except FeatureExtractorUnavailable:
        return None


def part_inception(args) -> dict:
    import numpy as np
    import torch

    from common import machine_info
    from dit.scoring.frechet import feature_statistics, frechet_distance
    from dit.scoring.inception import InceptionFeatures

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)
    tmp = None
    if args.random_weights:  # smoke test: the tests' random weights (same cost, meaningless features)
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import write_random_inception_weights

        tmp = tempfile.TemporaryDirectory()
        weights = write_random_inception_weights(Path(tmp.name) / "random-inception.pth")
    else:
        weights = find_inception_weights(args.weights)
        if weights is None:
            reason = ("skipped: no weights (give torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                      "with --inception-weights or DIT_INCEPTION_WEIGHTS, or put it in torch hub's cache)")
            print(reason)
            return {"status": "skipped", "reason": reason, "machine": machine, "args": vars(args)}
    sets = {"a": block_images(args.images, args.size, 8, args.seed),
            "b": block_images(args.images, args.size, 32, args.seed + 1)}
    out = {"status": "ok", "machine": machine, "smoke_test_not_a_measurement": device.type != "cuda",
           "random_weights": bool(args.random_weights), "args": vars(args), "precisions": {}}
    if device.type != "cuda":
        out["note"] = "on the CPU TF32 does not exist: tf32 computes what fp32 computes"
    pools = {}
    for precision in ("fp32", "tf32"):
        extractor = InceptionFeatures(weights, device=device, batch_size=args.batch_size, allow_download=False,
                                      precision=precision)
        extractor.extract(sets["a"][: args.batch_size])  # warm-up (cuDNN algorithm choice)
        seconds, feats = 0.0, {}
        for key, images in sets.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            feats[key] = extractor.extract(images)["pool"]
            seconds += time.perf_counter() - start
        pools[precision] = feats
        fid = frechet_distance(*feature_statistics(feats["a"]), *feature_statistics(feats["b"]))
        out["precisions"][precision] = {"fid": fid, "images_per_s": 2 * args.images / seconds,
                                        "backend_flags": extractor.backend_flags, "identity": extractor.identity}
        del extractor
    if tmp is not None:
        tmp.cleanup()
    f32, t32 = out["precisions"]["fp32"]["fid"], out["precisions"]["tf32"]["fid"]
    diff = max(float(np.abs(pools["fp32"][k].astype(np.float64) - pools["tf32"][k]).max()) for k in sets)
    scale = max(float(np.abs(pools["fp32"][k]).max()) for k in sets)
    out.update({"fid_fp32": f32, "fid_tf32": t32, "fid_abs_diff": abs(t32 - f32),
                "fid_rel_diff": abs(t32 - f32) / f32 if f32 else 0.0,
                "feature_max_abs_diff": diff, "feature_max_abs": scale,
                "tf32_speedup": out["precisions"]["tf32"]["images_per_s"] / out["precisions"]["fp32"]["images_per_s"]})
    print(f"# {machine['device']}, {args.images} + {args.images} images of {args.size}px, weights {weights.name}")
    print(f"FID fp32 {f32:.6g}, tf32 {t32:.6g}: |diff| {out['fid_abs_diff']:.3g} ({100 * out['fid_rel_diff']:.4f} %); "
          f"largest feature difference {diff:.3g} (features up to {scale:.3g}); tf32 / fp32 images/s "
          f"{out['tf32_speedup']:.2f}")
    return out


# --------------------------------------------------------------------------------------
# two_procs: 2 ranks on one device vs 1 process, the real trainer
# --------------------------------------------------------------------------------------


def train_overrides(args, run_dir: Path) -> list[str]:
    if args.size == "tiny":
        arch = ["model=DiT-S/4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
                "data.image_size=16", "data.num_per_class=4"]
    else:
        arch = [f"model={args.model}", f"data.image_size={args.image_size}", "data.num_per_class=100"]
    return ["data=toy", "vae=pixel", *arch, f"precision={args.precision}", f"global_batch_size={args.batch_size}",
            f"max_steps={args.steps}", f"log.every={args.log_every}", "log.samples.every=0",
            "ckpt.every=1000000", "ckpt.every_minutes=null", f"device={args.device}", "name=gpu_check",
            f"hydra.run.dir={run_dir}"]


def window_rates(metrics: Path) -> dict | None:
    from common import summary

    if not metrics.is_file():
        return None
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lines = [m for m in lines if "train/steps_per_sec" in m]
    if not lines:
        return None
    kept = lines[1:] or lines  # the first window holds the start-up (allocations, kernels)
    return {"steps_per_sec": summary(m["train/steps_per_sec"] for m in kept),
            "images_per_sec": summary(m["train/images_per_sec"] for m in kept),
            "windows": len(kept), "last_step": lines[-1]["step"]}


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (Linux /proc), parents first."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        tree += frontier
    return tree


def run_group(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | str, str]:
    """(return code or "timeout", output) of `cmd`, whose whole process tree (torchrun's ranks,
    each in a session of its own, too) is killed when it runs past `timeout` or when this process
    is terminated (gpu_check.sh's `timeout` signals only its own process group)."""
    log = cwd / ".run_group.out"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)

    def kill_tree(*_):
        for _ in range(2):  # again, for anything started while the first pass ran
            for pid in process_tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def terminated(*_):
        kill_tree()
        sys.exit(143)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        rc: int | str = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree()
        proc.wait()
        rc = "timeout"
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rc, log.read_text(errors="replace")


def part_two_procs(args) -> dict:
    from common import machine_info

    cuda = args.device.startswith("cuda")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_two_procs_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cuda:
        env.setdefault("NCCL_DEBUG", "WARN")  # NCCL's own line, should it refuse the two ranks
    else:
        env["OMP_NUM_THREADS"] = "1"
    out = {"machine": machine_info(args.device),
           "smoke_test_not_a_measurement": not cuda, "backend": "nccl" if cuda else "gloo", "args": vars(args)}
    if not cuda:
        out["note"] = "skipped on cpu: NCCL and a shared GPU need CUDA; 2 gloo ranks on the CPU ran instead"
    deadline = time.monotonic() + args.budget
    for ranks, key in ((1, "one_process"), (2, "two_processes")):
        run_dir = work / key
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        cmd = [sys.executable, *launcher, str(REPO / "train.py"), *train_overrides(args, run_dir)]
        left = deadline - time.monotonic() if ranks > 1 else args.budget * 0.55
        start = time.perf_counter()
        rc, log = run_group(cmd, work, env, max(left, 1))
        (work / f"{key}.log").write_text(log)
        rates = window_rates(run_dir / "metrics.jsonl")
        out[key] = {"ranks": ranks, "returncode": rc, "wall_s": time.perf_counter() - start, **(rates or {})}
        if rc != 0 or rates is None:
            duplicate = next((line.strip() for line in log.splitlines() if "Duplicate GPU" in line), None)
            if ranks == 2 and cuda and duplicate:
                out.update({"status": "not_supported",
                            "reason": f"not supported: NCCL refuses two ranks on one GPU ({duplicate[-300:]})"})
                print(out["reason"])
                return out
            tail = "\n".join(log.splitlines()[-30:])
            raise RuntimeError(f"train.py with {ranks} rank(s) failed (return code {rc}):\n{tail}")
    one, two = out["one_process"], out["two_processes"]
    out.update({"status": "ok", "ratio_steps_per_sec_two_over_one":
                two["steps_per_sec"]["median"] / one["steps_per_sec"]["median"]})
    print(f"# {out['machine']['device']}, train.py {' '.join(train_overrides(args, Path('DIR')))}")
    for key in ("one_process", "two_processes"):
        r = out[key]
        print(f"{key:<14} {r['steps_per_sec']['median']:9.2f} steps/s  {r['images_per_sec']['median']:9.1f} images/s "
              f"(median of {r['windows']} windows; {r['wall_s']:.1f} s in all)")
    print(f"two processes / one ({out['backend']}): {out['ratio_steps_per_sec_two_over_one']:.3f}x steps/s")
    return out


# --------------------------------------------------------------------------------------
# summary: gpu_check.json
# --------------------------------------------------------------------------------------


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def figures_of(part: str, r: dict) -> dict:
    """The headline figures of one part's JSON (None where the part has no such figure)."""
    if part == "mfu":
        v = _get(r, "variants", "off") or {}
        a = r.get("args", {})
        return {"model": a.get("model"), "batch_size": a.get("batch_size"), "dtype": a.get("dtype"),
                "attention": a.get("attention"), "compile": a.get("compile"),
                "matmul_peak_tflops": _get(r, "matmul_peak_tflops", "median"),
                "datasheet_tflops": r.get("datasheet_tflops"),
                "model_gflop_per_image": (_get(r, "flops_per_image", "off", "total") or 0) / 1e9 or None,
                "oom": v.get("oom"), "images_per_s": _get(v, "images_per_s", "median"),
                "step_ms": 1000 * _get(v, "step_s", "median") if _get(v, "step_s", "median") else None,
                "model_tflops_per_s": v.get("model_tflops_per_s"), "mfu": v.get("mfu"),
                "peak_allocated_gib": v.get("peak_allocated_gib"), "losses_finite": v.get("losses_finite")}
    if part == "memory":
        out = {"model": _get(r, "args", "model"), "batch_size": _get(r, "args", "batch_size"),
               "precision": _get(r, "args", "precision"), "method": r.get("method")}
        for name in ("plain", "checkpointed"):
            for k in ("baseline_mib", "peak_mib", "activation_mib"):
                out[f"{name}_{k}"] = _get(r, "variants", name, "summary", k, "median")
        out["ratio_activation_checkpointed_over_plain"] = r.get("ratio_activation_checkpointed_over_plain")
        out["gradients_equal_1e-6"] = _get(r, "gradient_check", "ok")
        out["gradient_max_rel_diff"] = _get(r, "gradient_check", "grad_max_rel_diff")
        return out
    if part == "two_procs":
        out = {"backend": r.get("backend")}
        for key in ("one_process", "two_processes"):
            out[f"{key}_steps_per_sec"] = _get(r, key, "steps_per_sec", "median")
            out[f"{key}_images_per_sec"] = _get(r, key, "images_per_sec", "median")
        out["ratio_steps_per_sec_two_over_one"] = r.get("ratio_steps_per_sec_two_over_one")
        return out
    if part == "sampling":
        out = {"model": _get(r, "args", "model"), "batch_size": _get(r, "args", "batch_size"),
               "precision": _get(r, "args", "precision")}
        for label, c in (r.get("configs") or {}).items():
            out[f"{label}_images_per_s"] = _get(c, "images_per_s", "median")
            out[f"{label}_nfe"] = c.get("nfe")
            out[f"{label}_speedup_vs_ddpm250"] = c.get("speedup_vs_ddpm250")
        return out
    if part == "inception":
        return {k: r.get(k) for k in ("fid_fp32", "fid_tf32", "fid_abs_diff", "fid_rel_diff", "feature_max_abs_diff",
                                      "tf32_speedup", "random_weights")}
    raise ValueError(f"unknown part {part!r}")


# Figures that must be numbers for a part to count as measured (its headline).
REQUIRED = {"mfu": ("images_per_s", "mfu", "matmul_peak_tflops"),
            "memory": ("plain_activation_mib", "checkpointed_activation_mib", "ratio_activation_checkpointed_over_plain"),
            "two_procs": ("one_process_steps_per_sec", "two_processes_steps_per_sec", "ratio_steps_per_sec_two_over_one"),
            "sampling": ("ddpm-250_images_per_s", "dpm++-10_images_per_s", "meanflow-1_images_per_s"),
            "inception": ("fid_fp32", "fid_tf32", "fid_abs_diff")}
CPU_NOTES = {
    "mfu": "skipped on cpu: bf16 autocast, flash attention and torch.compile need CUDA; the same code ran in fp32, "
           "eager, at tiny size",
    "memory": "CPU RSS instead of CUDA max_memory_allocated, tiny size",
    "two_procs": "skipped on cpu: NCCL and two ranks on one GPU need CUDA; 1 process vs 2 gloo ranks ran instead",
    "sampling": "tiny DiT on the CPU",
    "inception": "random Inception weights; TF32 does not exist on the CPU (the difference is 0 by construction)",
}


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def part_summary(args) -> tuple[dict, int]:
    import torch

    from common import machine_info

    smoke = bool(args.smoke)
    cuda = torch.cuda.is_available() and not smoke
    machine = machine_info("cuda" if cuda else "cpu", cuda=torch.version.cuda)
    result = {"smoke": smoke, "smoke_test_not_a_measurement": smoke, "device": machine["device"],
              "torch": torch.__version__, "machine": machine, "total_wall_s": args.total_wall_s,
              "budget_s": args.budget_s, "parts": {}}
    with open(args.parts, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    for name, rc, wall, budget, json_path, log_path in rows:
        entry = {"wall_s": float(wall), "budget_s": float(budget), "json": json_path, "log": log_path}
        if rc == "not_started":
            entry.update(status="timeout", reason="not started: the script's total time budget was spent")
        elif rc in ("124", "137"):
            entry.update(status="timeout", reason=f"ran past its budget of {budget} s", log_tail=tail(Path(log_path)))
        elif rc != "0" or not Path(json_path).is_file():
            last = tail(Path(log_path), 1).strip()
            entry.update(status="failed", returncode=rc, reason=f"return code {rc}" + (f": {last[-300:]}" if last else ""),
                         log_tail=tail(Path(log_path)))
        else:
            r = json.loads(Path(json_path).read_text())
            status = r.get("status", "ok")
            entry["status"] = status
            figures = figures_of(name, r)  # what there is (e.g. the 1-process figures when 2 ranks are refused)
            if any(v is not None for k, v in figures.items() if k in REQUIRED[name] or status == "ok"):
                entry["figures"] = figures
            if status != "ok":
                entry["reason"] = r.get("reason")
            else:
                missing = [k for k in REQUIRED[name] if not finite(figures.get(k))]
                if missing:
                    entry.update(status="failed", reason=f"no figure for {', '.join(missing)}")
            if smoke:
                entry["note"] = CPU_NOTES[name]
        result["parts"][name] = entry
    parts = result["parts"]  # in the script's order, whatever order the parts finished in
    result["parts"] = {name: parts.get(name, {"status": "failed", "reason": "not run"}) for name in PART_ORDER}
    statuses = {n: p["status"] for n, p in result["parts"].items()}
    if smoke:  # every part must have produced its figures
        ok = all(s == "ok" for s in statuses.values())
    else:  # a recorded reason (no weights, not supported) is an answer; a failure or timeout is not
        ok = all(s in ("ok", "skipped", "not_supported") for s in statuses.values())
    result["ok"] = ok
    write_json(Path(args.out) / "gpu_check.json", result)
    print(f"# gpu_check: {machine['device']}, torch {torch.__version__}{' [CPU SMOKE TEST, NOT A MEASUREMENT]' if smoke else ''}")
    for name in PART_ORDER:
        p = result["parts"][name]
        line = f"{name:<10} {p['status']:<14}"
        if p.get("reason"):
            line += "  " + p["reason"]
        elif p.get("figures"):
            line += "  " + ", ".join(f"{k}={_fmt(p['figures'][k])}" for k in REQUIRED[name])
        print(line)
    print(f"summary: {Path(args.out) / 'gpu_check.json'} ({'all parts answered' if ok else 'NOT all parts answered'})")
    return result, 0 if ok else 1


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)

    s = sub.add_parser("sampling")
    s.add_argument("--model", default="DiT-XL/2", help="an official size, or tiny")
    s.add_argument("--input-size", type=int, default=32, help="latent side (32: 256 px images with a KL-f8 VAE)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--cfg-scale", type=float, default=1.5, help="DDPM and DPM++ (MeanFlow samples at 1)")
    s.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"], help="the network forward")
    s.add_argument("--repeats", type=int, default=2)

    i = sub.add_parser("inception")
    i.add_argument("--weights", default=os.environ.get("DIT_INCEPTION_WEIGHTS") or None,
                   help="torch-fidelity's Inception weights (default: $DIT_INCEPTION_WEIGHTS, else torch hub's cache)")
    i.add_argument("--random-weights", action="store_true", help="random weights (smoke test: the figures mean nothing)")
    i.add_argument("--images", type=int, default=1000, help="images per set (two sets)")
    i.add_argument("--size", type=int, default=256, help="image side before Inception's resize to 299")
    i.add_argument("--batch-size", type=int, default=100)

    t = sub.add_parser("two_procs")
    t.add_argument("--size", default="gpu", choices=["gpu", "tiny"], help="tiny: the CPU smoke test's model and data")
    t.add_argument("--model", default="DiT-B/2")
    t.add_argument("--image-size", type=int, default=32, help="toy images in pixel space (32: 16x16 tokens with patch 2)")
    t.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    t.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    t.add_argument("--steps", type=int, default=80)
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--budget", type=float, default=65, help="seconds for both runs (55 %% at most for the first)")
    t.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary folder)")

    for q in (s, i, t):
        q.add_argument("--device", default="cuda")
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--json", required=True, help="write the results to this file")

    m = sub.add_parser("summary")
    m.add_argument("--out", required=True, help="the folder of the parts' JSON; gpu_check.json is written there")
    m.add_argument("--parts", required=True, help="tab-separated: name, return code, wall s, budget s, json, log")
    m.add_argument("--smoke", action="store_true")
    m.add_argument("--total-wall-s", type=float, default=None)
    m.add_argument("--budget-s", type=float, default=None)
    args = p.parse_args()

    if args.part == "summary":
        return part_summary(args)[1]
    run = {"sampling": part_sampling, "inception": part_inception, "two_procs": part_two_procs}[args.part]
    result = run(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
