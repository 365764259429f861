"""Issue 23, item 8: comparing runs was reading JSON. `python -m dit.report PATH ...`
(dit/cli/report.py, dit/reporting/) reads the runs' metrics.jsonl and writes one PNG of their loss
and evaluation curves (one line per run, labelled by the swept values) and a markdown table of
final and best scores.

Made-up runs of a two-job sweep, whose numbers are worked out here by hand: the table's final and
best values and their steps, the labels (the swept override, not the shared ones), the picture's
size and each panel drawn with both runs' colours; a cut-short last metrics line is skipped; a run
without evaluation gets the loss panel alone; a path without runs ends in one `error:` line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_one_line, run_script

from dit.cli import report as program
from dit.reporting.charts import LEGEND_ROW_HEIGHT, PALETTE, PANEL_SIZE, TITLE_HEIGHT

SHARED = ["experiment=quickstart", "max_steps=8"]
# Per job: the loss at steps 1..8, and (step, fid, class accuracy) at the evaluation steps 4 and 8.
JOBS = {
    "optim.lr=0.001": ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4], [(4, 50.0, 0.5), (8, 60.0, 0.4)]),
    "optim.lr=0.002": ([1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2], [(4, 40.0, 0.6), (8, 30.0, 0.7)]),
}


def write_run(run_dir: Path, losses, evals, overrides=None, tail: str = "") -> Path:
    """A run directory as train.py leaves it: metrics.jsonl (a train line per step, an eval line
    at evaluation steps) and, for a sweep job, .hydra/overrides.yaml."""
    run_dir.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "train/loss": loss, "train/lr": 1e-3, "train/grad_norm": 0.3})
        for s, fid, acc in evals:
            if s == step:
                lines.append({"step": s, "eval/num_samples": 100, "eval/num_reference": 1000, "eval/fid": fid,
                              "eval/class_accuracy": acc, "eval/seconds": 3.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


def write_sweep(root: Path) -> Path:
    """multirun/<job>/ for the two jobs, the folders named (as hydra cuts a long name to a hash,
    dit.config job_dirname) in the other order than the swept values; the second job's last line
    was cut short by a crash."""
    sweep = root / "multirun"
    for i, (swept, (losses, evals)) in enumerate(JOBS.items()):
        tail = '{"step": 9, "train/loss": 0.1' if i == 1 else ""
        write_run(sweep / f"experiment=quickstart,optim-{'ba'[i]}", losses, evals, [SHARED[0], swept, SHARED[1]], tail)
    return sweep


def parse_table(text: str) -> list[dict]:
    """The markdown table's rows as {column: cell}."""
    rows = [line.strip().strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], rows[2:]
    return [dict(zip(header, (c.strip() for c in row))) for row in body]


def test_the_report_of_a_sweep_tables_final_and_best_scores_labelled_by_the_swept_values(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    program.main([str(sweep)])
    printed = capsys.readouterr().out
    md = (sweep / "report.md").read_text()
    rows = parse_table(md)
    assert rows == parse_table(printed)  # the table is printed too
    # Labelled by the swept values, not the shared keys or the folders, and in the order of the values.
    assert [row["run"] for row in rows] == ["optim.lr=0.001", "optim.lr=0.002"]
    a, b = rows
    assert a["last step"] == b["last step"] == "8"  # the cut-short step-9 line is skipped
    assert (a["final loss"], b["final loss"]) == ("0.4", "0.2")
    # fid: lower is better. Run a got worse after step 4; run b kept improving.
    assert (a["fid final"], a["fid best (lower is better)"]) == ("60 (step 8)", "50 (step 4)")
    assert (b["fid final"], b["fid best (lower is better)"]) == ("30 (step 8)", "30 (step 8)")
    # class accuracy: higher is better.
    assert (a["class_accuracy final"], a["class_accuracy best (higher is better)"]) == ("0.4 (step 8)", "0.5 (step 4)")
    assert (b["class_accuracy final"], b["class_accuracy best (higher is better)"]) == ("0.7 (step 8)", "0.7 (step 8)")
    # Counts and timings of an evaluation are no scores.
    assert not any(key.startswith(("num_", "seconds")) for key in a)
    assert "skipped 1 unreadable line" in printed and "![curves](report.png)" in md
    assert "Overrides of every run: `experiment=quickstart` `max_steps=8`" in md


def panel_pixels(image: np.ndarray, row: int, col: int, header: int) -> np.ndarray:
    """The inside of a panel's plot frame (dit.reporting.charts.draw_panel's margins)."""
    w, h = PANEL_SIZE
    x0, y0 = col * w, header + row * h
    return image[y0 + 29: y0 + h - 37, x0 + 61: x0 + w - 11]


def count(pixels: np.ndarray, colour) -> int:
    return int((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


def test_the_report_draws_a_loss_panel_and_a_panel_per_metric_one_colour_per_run(tmp_path):
    sweep = write_sweep(tmp_path)
    out = tmp_path / "report"
    program.main([str(sweep), "--out", str(out)])
    image = np.asarray(Image.open(out / "report.png").convert("RGB"))
    header = TITLE_HEIGHT + LEGEND_ROW_HEIGHT  # the title, then one legend row (two short labels)
    # Three panels (loss, fid, class accuracy) in rows of two.
    assert image.shape == (header + 2 * PANEL_SIZE[1], 2 * PANEL_SIZE[0], 3)
    for row, col in ((0, 0), (0, 1), (1, 0)):
        inside = panel_pixels(image, row, col, header)
        # Each run's line is drawn in its own colour, in every panel.
        assert count(inside, PALETTE[0]) >= 20 and count(inside, PALETTE[1]) >= 20, (row, col)
    assert (panel_pixels(image, 1, 1, header) == 255).all()  # the fourth cell stays empty
    # The legend names the runs in their colours.
    legend = image[TITLE_HEIGHT: header]
    assert count(legend, PALETTE[0]) > 0 and count(legend, PALETTE[1]) > 0
    assert not (sweep / "report.png").exists()


def test_runs_without_evaluation_or_overrides_get_the_loss_panel_and_their_folder_names(tmp_path, capsys):
    write_run(tmp_path / "runs" / "small", [1.0, 0.5, 0.25], [])
    write_run(tmp_path / "runs" / "large", [1.0, 0.4, 0.2], [])
    program.main([str(tmp_path / "runs" / "small"), str(tmp_path / "runs" / "large" / "metrics.jsonl")])
    rows = parse_table(capsys.readouterr().out)
    assert rows == [{"run": "small", "last step": "3", "final loss": "0.25"},
                    {"run": "large", "last step": "3", "final loss": "0.2"}]
    image = Image.open(tmp_path / "runs" / "report.png")  # the folder the two runs share
    assert image.size == (PANEL_SIZE[0], TITLE_HEIGHT + LEGEND_ROW_HEIGHT + PANEL_SIZE[1])  # the loss panel alone


def test_a_path_without_runs_is_one_error_line_naming_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "empty"
    monkeypatch.setattr(sys, "argv", ["python -m dit.report", str(missing)])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        program.run()
    assert_one_line(exit_.value.code, capsys.readouterr().err, str(missing), "metrics.jsonl")
    assert not list(missing.iterdir())  # nothing written


def test_python_m_dit_report_runs_the_program(tmp_path):
    sweep = write_sweep(tmp_path)
    done = run_script("dit.report", [str(sweep)], cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| optim.lr=0.002 |" in done.stdout and (sweep / "report.png").is_file()
    typo = run_script("dit.report", [str(tmp_path / "multirun_typo")], cwd=REPO, timeout=120)
    assert_one_line(typo.returncode, typo.stderr, str(tmp_path / "multirun_typo"), "does not exist")
