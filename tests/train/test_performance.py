"""The speed-ups change nothing but speed: the fused AdamW default computes the update of the
reference optimizer and resumes from its state, and the host-allocator setting is applied only
where it may be."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from dit.config import OptimConfig
from dit.models import DiT, DiT_models

from conftest import REPO, tiny_dit
from dit.train import EMA, build_optimizer



def _tiny_dit(seed: int = 0) -> DiT:
    return tiny_dit(seed=seed, num_classes=10).train()  # off the adaLN-Zero init: every weight gets a gradient


def _train(model: DiT, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """Optimizer steps on a fixed sequence of gradients (one real backward's gradients, rescaled
    per step), so two optimizers can be compared without the model feeding rounding back."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    probe = _tiny_dit(seed=3)
    probe(x, t, y).square().mean().backward()
    grads = [p.grad.clone() for p in probe.parameters() if p.requires_grad]
    for step in range(steps):
        noise = [torch.randn(gr.shape, generator=g) * gr.abs().mean() for gr in grads]
        for p, gr, n in zip([p for p in model.parameters() if p.requires_grad], grads, noise):
            p.grad = (1 + step) * gr + n
        opt.step()


def test_default_optimizer_is_fused_on_cpu_and_foreach_under_fsdp():
    params = [torch.nn.Parameter(torch.randn(3))]
    assert build_optimizer(params, OptimConfig(), torch.device("cpu")).defaults["fused"] is True
    assert not build_optimizer(params, OptimConfig(), torch.device("cpu"), parallel="fsdp").defaults["fused"]
    assert not build_optimizer(params, OptimConfig(fused=False), torch.device("cpu")).defaults["fused"]


def test_fused_adamw_matches_the_reference_update_and_hyperparameters():
    cfg = OptimConfig(lr=3e-3, weight_decay=0.01, betas=[0.8, 0.95], eps=1e-6)
    fused_model, ref_model = _tiny_dit(), _tiny_dit()
    fused = build_optimizer(fused_model.parameters(), cfg, torch.device("cpu"))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.8, 0.95), eps=1e-6,
                            foreach=False)  # the single-tensor loop: AdamW written out
    _train(fused_model, fused, 5)
    _train(ref_model, ref, 5)
    for (name, a), b in zip(fused_model.named_parameters(), ref_model.parameters()):
        moved = (b - _tiny_dit().state_dict()[name]).abs().max()
        assert moved > 0 or not a.requires_grad, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_optimizer_resumes_from_a_foreach_state_and_continues_the_same_run():
    cfg = OptimConfig(lr=1e-3)
    a, b = _tiny_dit(), _tiny_dit()
    opt_a = build_optimizer(a.parameters(), OptimConfig(lr=1e-3, fused=False), torch.device("cpu"))
    _train(a, opt_a, 3)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b.parameters(), cfg, torch.device("cpu"))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a checkpoint file: no shared tensors
    _train(a, opt_a, 3, seed=2)
    _train(b, opt_b, 3, seed=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_update_touches_every_parameter_once():
    model = _tiny_dit()
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for old, new, p in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p)


def _run(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_allocator_tuning_stops_page_faults_per_step_and_yields_to_user_settings():
    # One 'step' mallocs, touches and frees 8 blocks of 12 MB (3072 pages each), as a CPU training
    # step does with activations through torch's allocator (which is glibc's posix_memalign).
    # Straight libc calls keep Python's and torch's small allocations out of the heap layout.
    probe = """
import ctypes, resource
from dit.cli.runtime import tune_host_allocator
applied = TUNE and tune_host_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(12 << 20) for _ in range(8)]
    for b in blocks:
        libc.memset(b, 1, 12 << 20)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[2:]))
"""
    applied, faults = _run(probe.replace("TUNE", "True")).split()
    assert applied == "True" and int(faults) == 0, faults  # freed blocks stay mapped and are reused
    _, plain_faults = _run(probe.replace("TUNE", "False")).split()
    # glibc's default trims the freed heap top and faults all 8 blocks in again every step.
    assert int(plain_faults) > 6 * 8 * 3000, plain_faults
    # A user's own glibc setting wins: nothing is changed.
    assert _run(probe.replace("TUNE", "True"), MALLOC_ARENA_MAX_="2").split()[0] == "False"


@pytest.mark.slow
def test_train_step_benchmark_runs_every_variant_and_reports_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--models", "DiT-S/8", "--input-size", "8",
                    "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--threads", "1", "--extra",
                    "--json", str(out)], cwd=REPO, check=True, capture_output=True, timeout=300)
    (r,) = json.loads(out.read_text())["results"]
    v = r["variants"]
    assert set(v) == {"ours", "diffusers", "reference", "diffusers+ours", "ours, default malloc"}
    # ours and reference train the same (our) DiT-S/8; diffusers' peer has its own count.
    expected = sum(p.numel() for p in DiT_models["DiT-S/8"](input_size=8).parameters())
    assert v["ours"]["params"] == v["reference"]["params"] == v["ours, default malloc"]["params"] == expected
    assert v["diffusers"]["params"] == v["diffusers+ours"]["params"] != expected
    assert r["flops_per_step"] > 0 and all(x["s_per_step"]["median"] > 0 for x in v.values())
    assert r["ratio_ours_over_diffusers"] == pytest.approx(v["ours"]["images_per_s"] / v["diffusers"]["images_per_s"])
