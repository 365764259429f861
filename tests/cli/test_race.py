"""The convergence race benchmark (benchmarks/bench_convergence_race.py): its plumbing on a few
steps (every sampler family, the REPA encoder it trains, the results file and the plot), and the
goal arithmetic on made-up curves."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_convergence_race as race  # noqa: E402


@pytest.mark.slow
def test_quick_race_trains_samples_and_scores_each_recipe_family(tmp_path):
    out_json, out_png = tmp_path / "race.json", tmp_path / "race.png"
    results = race.main(["--quick", "--datasets", "colours", "--recipes", "dit", "sit_repa", "--out",
                         str(tmp_path / "out"), "--json", str(out_json), "--plot", str(out_png)])
    assert json.loads(out_json.read_text())["protocol"]["nfe"] == race.NFE == 20
    runs = results["datasets"]["colours"]["runs"]
    assert set(runs) == {"dit", "sit_repa"}
    # The same sampler budget: DDIM-20 for diffusion, Heun-10 (two evaluations a step) for flow.
    assert runs["dit"]["sampler"] == "DDIM 20 steps" and runs["sit_repa"]["sampler"] == "Heun ODE 10 steps"
    for run in runs.values():
        assert [p["step"] for p in run["curve"]] == [2, 4]  # --quick: 4 steps, a checkpoint every 2
        for point in run["curve"]:
            assert 0.0 <= point["class_accuracy"] <= 1.0 and point["judge_fd"] > 0
    # REPA's encoder is trained here and handed to the trainer as a save_for_hf directory.
    encoder_dir = tmp_path / "out" / "encoder_colours"
    assert (encoder_dir / "config.json").is_file() and f"repa.encoder={encoder_dir}" in runs["sit_repa"]["overrides"]
    assert any(o.startswith("objective=flow") for o in runs["sit_repa"]["overrides"])
    assert Image.open(out_png).size[0] > 0
    # Two recipes were run with the same noise: different models give different samples and scores.
    assert runs["dit"]["curve"][-1]["judge_fd"] != runs["sit_repa"]["curve"][-1]["judge_fd"]


def _curve(*points):
    return {"curve": [{"step": s, "judge_fd": fd, "class_accuracy": 0.5} for s, fd in points]}


def test_goal_is_the_first_step_at_or_below_the_baselines_final_distance():
    results = {"datasets": {"colours": {"runs": {
        "dit": _curve((100, 900.0), (200, 400.0), (400, 100.0)),
        "sit": _curve((100, 150.0), (200, 90.0), (400, 50.0)),      # reaches 100 at 200: 1/2
        "sit_repa": _curve((100, 100.0), (200, 60.0), (400, 30.0)),  # at 100: 1/4, the goal
        "sit_lightning": _curve((100, 500.0), (200, 300.0), (400, 120.0)),  # never
    }}}}
    goal = race.goal_summary(results)["colours"]
    assert goal["baseline_final_fd"] == 100.0 and goal["baseline_steps"] == 400
    assert goal["reach"]["sit"] == {"first_step": 200, "fraction_of_baseline": 0.5, "class_accuracy_then": 0.5}
    assert goal["reach"]["sit_lightning"] == {"first_step": None, "fraction_of_baseline": None,
                                              "class_accuracy_then": None}
    assert goal["best"] == "sit_repa" and goal["goal_met"] is True
    results["datasets"]["colours"]["runs"].pop("sit_repa")
    goal = race.goal_summary(results)["colours"]
    assert goal["best"] == "sit" and goal["goal_met"] is False
