"""The NFE race benchmark (benchmarks/bench_nfe_race.py, issue 24): its plumbing on a few steps
(three objectives, their samplers at NFE 1, 2, 4, CFG and autoguidance, the results file, the plot,
reuse of an earlier invocation's runs and scores), the clear refusal of autoguidance where the
sampler lacks it, the NFE bookkeeping and the goal arithmetic on made-up points."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_nfe_race as nfe  # noqa: E402


def test_each_sampler_spends_exactly_the_nfe_or_is_left_out():
    assert [nfe.num_steps_for("heun", n) for n in (1, 2, 4, 10, 20, 50)] == [None, 1, 2, 5, 10, 25]
    assert [nfe.num_steps_for("ddim", n) for n in (1, 2, 20)] == [None, 2, 20]  # a DDIM chain needs both ends
    for sampler in ("dpm++", "euler", "meanflow"):
        assert [nfe.num_steps_for(sampler, n) for n in (1, 2, 50)] == [1, 2, 50]


def test_a_cfg_point_serves_every_guide_and_an_autoguidance_point_only_its_own():
    """nfe_scores.json keys: CFG's samples do not depend on the autoguidance guide, so its key
    leaves the guide out and a sweep over guides reuses it (also under the older key, which named
    the guide); autoguidance's key names the guide's step and scale."""
    from types import SimpleNamespace

    scorer = object.__new__(nfe.Scorer)
    args = dict(num_samples=250, num_real=1000, cfg_scale=2.0, autog_scale=2.0)
    scorer.args = SimpleNamespace(**args, guide_step=500)
    at_1000 = SimpleNamespace(**args, guide_step=1000)
    cfg_key, auto_key = scorer.key("euler", "cfg", 4), scorer.key("euler", "autoguidance", 4)
    assert "guide" not in cfg_key and "guide500" in auto_key and "autog2" in auto_key
    scorer.args = at_1000
    assert scorer.key("euler", "cfg", 4) == cfg_key and scorer.key("euler", "autoguidance", 4) != auto_key

    legacy = "euler|cfg|nfe4|n250|real1000|cfg2|autog2|guide500|seed0"
    assert nfe.Scorer.LEGACY_GUIDE.sub("", legacy) == cfg_key
    scorer.cache = {legacy: {"judge_fd": 12.5}, auto_key: {"judge_fd": 3.0}}
    assert scorer.point("sit", "euler", "cfg", 4) == {"judge_fd": 12.5}  # reused, nothing sampled


@pytest.mark.slow
def test_quick_nfe_race_scores_every_objective_sampler_and_guidance_then_reuses_them(tmp_path, monkeypatch):
    guidance = ["cfg", "autoguidance"] if nfe.autoguidance_available() else ["cfg"]
    out_json, out_png = tmp_path / "nfe.json", tmp_path / "nfe.png"
    argv = ["--quick", "--datasets", "colours", "--guidance", *guidance, "--out", str(tmp_path / "out"),
            "--json", str(out_json), "--plot", str(out_png)]
    results = nfe.main(argv)
    protocol = json.loads(out_json.read_text())["protocol"]
    assert protocol["nfes"] == [1, 2, 4] and protocol["steps"] == 4 and protocol["guide_step"] == 2
    runs = results["datasets"]["colours"]["runs"]
    assert set(runs) == {"dit", "sit", "meanflow"}
    assert "objective=meanflow" in runs["meanflow"]["overrides"] and "objective=flow" in runs["sit"]["overrides"]
    for objective, run in runs.items():
        got = {(p["sampler"], p["guidance"], p["nfe"]) for p in run["points"]}
        want = {(s, g, n) for s in nfe.SAMPLERS[objective] for g in guidance for n in (1, 2, 4)
                if nfe.num_steps_for(s, n) is not None}
        assert got == want
        for p in run["points"]:
            assert 0.0 <= p["class_accuracy"] <= 1.0 and p["judge_fd"] > 0
            assert p["num_steps"] == (p["nfe"] // 2 if p["sampler"] == "heun" else p["nfe"])
            guided = not (objective == "meanflow" and p["guidance"] == "cfg")  # MeanFlow: trained-in guidance
            assert p["cfg_scale"] == (2.0 if guided else 1.0)
            assert p["forward_rows"] == p["nfe"] * (2 if guided else 1)
    # The guide of autoguidance is the run's own earlier checkpoint.
    assert (tmp_path / "out" / "runs" / "colours_sit" / "checkpoints" / "0000002.pt").is_file()
    assert Image.open(out_png).size[0] > 0
    assert results["goal"]["all"]["issue_budget"] is False  # 4 steps on one toy set is no verdict
    # An interrupted race resumes: nothing is trained again, every scored point is read back.
    monkeypatch.setattr(nfe, "run_training", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(nfe.Scorer, "load_guide", lambda self: pytest.fail("sampled again"))
    monkeypatch.setattr(nfe, "generate_samples", lambda *a, **k: pytest.fail("sampled again"))
    again = nfe.main(argv)
    assert again["datasets"]["colours"]["runs"]["meanflow"]["points"] == runs["meanflow"]["points"]


def test_autoguidance_without_the_sampler_support_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(nfe, "autoguidance_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        nfe.main(["--quick", "--guidance", "autoguidance"])
    assert exc.value.code == 2
    assert "no guidance=autoguidance" in capsys.readouterr().err


def _points(objective, rows):
    return {"points": [{"objective": objective, "sampler": s, "guidance": g, "nfe": n, "judge_fd": fd,
                        "class_accuracy": 0.5} for s, g, n, fd in rows]}


def test_goal_compares_meanflow_1_and_2_with_ddim_20_and_heun_20_and_counts_autoguidance_wins():
    runs = {"dit": _points("dit", [("ddim", "cfg", 20, 100.0), ("ddim", "autoguidance", 20, 90.0)]),
            "sit": _points("sit", [("heun", "cfg", 20, 40.0), ("heun", "autoguidance", 20, 50.0)]),
            "meanflow": _points("meanflow", [("meanflow", "cfg", 1, 100.0), ("meanflow", "cfg", 2, 60.0)])}
    results = {"protocol": {"steps": 2000, "quickstart_steps": 2000, "reduced": ""},
               "datasets": {"colours": {"runs": runs}}}
    goal = nfe.goal_summary(results)
    colours = goal["colours"]
    assert colours["meanflow_1_vs_ddim_20"] is True  # 100 <= 100
    assert colours["meanflow_2_vs_heun_20"] is True  # 60 <= 1.5 x 40
    assert colours["autoguidance"]["dit"] == {"lower_at": ["ddim-20"], "points": 1, "met": True}
    assert colours["autoguidance"]["sit"]["met"] is False and "meanflow" not in colours["autoguidance"]
    assert goal["all"] == {"meanflow_goals": True, "autoguidance_goal": True, "issue_budget": False}  # one toy set
    runs["meanflow"]["points"][1]["judge_fd"] = 61.0
    assert nfe.goal_summary(results)["all"]["meanflow_goals"] is False
    results["datasets"]["shapes"] = {"runs": runs}
    assert nfe.goal_summary(results)["all"]["issue_budget"] is True
