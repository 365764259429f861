"""Issue 24: the GPU check's CPU smoke mode (`bash benchmarks/gpu_check.sh --smoke --out DIR`) runs
every part at tiny size on the CPU, writes one JSON per part and the summary gpu_check.json into
DIR (never into benchmarks/results), and exits 0 only when every part produced its figures. No
figure's value is asserted (timings on a shared CPU mean nothing), only that each part has them."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PARTS = ("mfu", "memory", "two_procs", "sampling", "inception")


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_smoke_mode_runs_every_part_and_writes_their_figures(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before  # committed results untouched

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["smoke"] is True and summary["smoke_test_not_a_measurement"] is True and summary["ok"] is True
    assert summary["device"] == "cpu" and summary["torch"]
    assert list(summary["parts"]) == list(PARTS)
    for name in PARTS:
        part = summary["parts"][name]
        assert part["status"] == "ok", (name, part)
        assert (out / f"gpu_check_{name}.json").is_file() and (out / "gpu_check_logs" / f"{name}.log").is_file()
        assert part["note"]  # what the CPU could not exercise
    f = {name: summary["parts"][name]["figures"] for name in PARTS}

    # 1. MFU: the training step ran (the code path of bf16 + flash + compile, in fp32 eager here).
    assert f["mfu"]["oom"] is False and f["mfu"]["losses_finite"] is True
    assert all(number(f["mfu"][k]) and f["mfu"][k] > 0 for k in ("images_per_s", "mfu", "matmul_peak_tflops",
                                                                 "model_gflop_per_image"))
    # 2. memory with and without checkpointing, and the same gradients.
    for k in ("plain_activation_mib", "checkpointed_activation_mib", "ratio_activation_checkpointed_over_plain"):
        assert number(f["memory"][k])
    assert f["memory"]["gradients_equal_1e-6"] is True
    # 3. 1 process vs 2 ranks (gloo on the CPU), steps/s from the trainer's metrics.
    assert f["two_procs"]["backend"] == "gloo"
    for k in ("one_process_steps_per_sec", "two_processes_steps_per_sec", "ratio_steps_per_sec_two_over_one"):
        assert number(f["two_procs"][k]) and f["two_procs"][k] > 0
    # 4. sampling: each sampler's network evaluations are what its name says.
    assert (f["sampling"]["ddpm-250_nfe"], f["sampling"]["dpm++-10_nfe"], f["sampling"]["meanflow-1_nfe"]) == (250, 10, 1)
    assert f["sampling"]["ddpm-250_speedup_vs_ddpm250"] == 1.0
    assert all(number(f["sampling"][f"{c}_images_per_s"]) for c in ("ddpm-250", "dpm++-10", "meanflow-1"))
    # 5. Inception fp32 vs tf32: on the CPU TF32 does not exist, so the two FIDs are the same.
    assert f["inception"]["random_weights"] is True and number(f["inception"]["fid_fp32"])
    assert f["inception"]["fid_abs_diff"] == 0.0 and f["inception"]["fid_fp32"] == f["inception"]["fid_tf32"]


def test_smoke_mode_refuses_to_write_into_the_committed_results():
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(REPO / "benchmarks" / "results")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "never writes to benchmarks/results" in proc.stderr
