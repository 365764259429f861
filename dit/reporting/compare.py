"""Runs compared: one PNG of their curves (the training loss, smoothed, on a log scale, and each
evaluation metric against the training step: one line per run, labelled in a legend) and a
markdown table of their final and best scores. What `python -m dit.report` writes
(dit/cli/report.py), and the quickstart's picture."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from dit.io.atomic import write_atomic, write_text_atomic
from dit.reporting.charts import Panel, Series, colour_of, figure
from dit.reporting.runs import Run, finite

# Which way is better, by metric name (metrics.jsonl's `eval/<name>`; the quickstart's `judge_fd`).
# A metric in neither set is drawn and its final value tabled, with no "best".
LOWER_IS_BETTER = frozenset({"fid", "sfid", "fd", "judge_fd", "kid", "loss"})
HIGHER_IS_BETTER = frozenset({"class_accuracy", "accuracy", "inception_score", "isc", "precision", "recall"})
# Distances spanning orders of magnitude over a run (an untrained model's FD is 50x a trained one's).
LOG_SCALE = frozenset({"fid", "sfid", "fd", "judge_fd"})
# Fractions, drawn on a 0 to 1 axis (a change of 0.01 near chance does not fill the panel).
FRACTIONS = frozenset({"class_accuracy", "accuracy", "precision", "recall"})
COLUMNS = 2  # panels per row of the figure
SMOOTHING_POINTS = 25  # the loss is averaged over about 1/25 of its logged points


def direction(metric: str) -> Optional[str]:
    """"lower" or "higher" (is better), or None for a metric not named in the sets above."""
    return "lower" if metric in LOWER_IS_BETTER else "higher" if metric in HIGHER_IS_BETTER else None


def best(metric: str, points: Sequence[tuple[int, float]]) -> Optional[tuple[int, float]]:
    """(step, value) of the best finite value (the first step that reaches it), or None."""
    way, values = direction(metric), finite(points)
    if way is None or not values:
        return None
    pick = min if way == "lower" else max
    target = pick(v for _, v in values)
    return next((s, v) for s, v in values if v == target)


def smoothing_window(count: int) -> int:
    """The moving average's width for `count` logged values: odd, about count / SMOOTHING_POINTS."""
    return max(1, count // SMOOTHING_POINTS) | 1


def smooth(points: Sequence[tuple[int, float]], window: Optional[int] = None) -> list[tuple[int, float]]:
    """A centred moving average of the finite values over `window` points (odd; default:
    `smoothing_window`), narrower at the ends."""
    values = finite(points)
    half = (window or smoothing_window(len(values))) // 2
    out = []
    for i, (step, _) in enumerate(values):
        part = values[max(0, i - half): i + half + 1]
        out.append((step, sum(v for _, v in part) / len(part)))
    return out


def metric_names(runs: Sequence[Run]) -> list[str]:
    """The evaluation metrics any run has, the known ones first (better-is-lower, then higher)."""
    names = list(dict.fromkeys(name for run in runs for name in run.scores))
    rank = {"lower": 0, "higher": 1, None: 2}
    return sorted(names, key=lambda n: (rank[direction(n)], n))


def _note(metric: str) -> str:
    way = direction(metric)
    return f"{way} is better" if way else ""


def panels(runs: Sequence[Run]) -> list[Panel]:
    """The loss panel, then one per evaluation metric; run i drawn in colour i."""
    losses = []
    for i, run in enumerate(runs):
        raw = finite(run.loss)
        window = smoothing_window(len(raw))
        losses.append(Series(run.label, smooth(raw, window), colour_of(i), markers=len(raw) < 2,
                             raw=raw if window > 1 else None))
    smoothed = "; moving average, raw values pale" if any(s.raw for s in losses) else ""
    out = [Panel(f"training loss (log scale{smoothed})", losses, log_y=True, legend=False, round_ticks=True)]
    for name in metric_names(runs):
        series = [Series(run.label, run.scores.get(name, []), colour_of(i)) for i, run in enumerate(runs)]
        notes = ", ".join(n for n in ("log scale" if name in LOG_SCALE else "", _note(name)) if n)
        out.append(Panel(f"evaluation: {name}" + (f" ({notes})" if notes else ""), series, log_y=name in LOG_SCALE,
                         legend=False, round_ticks=True, y_range=(0.0, 1.0) if name in FRACTIONS else None))
    return out


def draw(runs: Sequence[Run], title: str):
    """The comparison figure (a PIL image): panels in rows of COLUMNS, a legend of the runs on top."""
    items = panels(runs)
    columns = min(COLUMNS, len(items))
    grid = [items[i: i + columns] for i in range(0, len(items), columns)]
    return figure(title, grid, legend=[(run.label, colour_of(i)) for i, run in enumerate(runs)])


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def table(runs: Sequence[Run]) -> str:
    """The markdown table: per run its label, last logged step, final loss, and per evaluation
    metric its final value and its best (lower or higher, as the column says) with the step."""
    names = metric_names(runs)
    head = ["run", "last step", "final loss"]
    for name in names:
        way = direction(name)
        head += [f"{name} final", f"{name} best ({way} is better)" if way else f"{name} best (direction unknown)"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for run in runs:
        cells = [run.label.replace("|", "\\|"), str(run.last_step), _fmt(run.loss[-1][1] if run.loss else None)]
        for name in names:
            points = run.scores.get(name, [])
            top = best(name, points)
            cells += [f"{_fmt(points[-1][1])} (step {points[-1][0]})" if points else "-",
                      f"{_fmt(top[1])} (step {top[0]})" if top else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shared_overrides(runs: Sequence[Run]) -> list[str]:
    """The overrides every run was launched with (none if a run has no record)."""
    if not runs or any(run.overrides is None for run in runs):
        return []
    return [o for o in runs[0].overrides if all(o in run.overrides for run in runs[1:])]  # type: ignore[union-attr]


def markdown(runs: Sequence[Run], title: str, image_name: str) -> str:
    """report.md: the title, the picture, the table, the overrides the runs share and where each run lives."""
    folders = [f"- {run.label}: `{run.path}`" + (f" ({run.unreadable_lines} unreadable metrics line(s) skipped)"
                                                  if run.unreadable_lines else "") for run in runs]
    shared = shared_overrides(runs)
    common = ["Overrides of every run: " + " ".join(f"`{o}`" for o in shared), ""] if len(runs) > 1 and shared else []
    return "\n".join([f"# {title}", "", f"![curves]({image_name})", "", table(runs), "", *common, "Runs:", "",
                      *folders, ""])


def write_report(runs: Sequence[Run], out_dir: str | os.PathLike, title: str = "Runs compared",
                 stem: str = "report") -> tuple[Path, Path]:
    """`<out_dir>/<stem>.png` (the curves) and `<stem>.md` (the table), written atomically; returns both paths."""
    out_dir = Path(out_dir)
    png, md = out_dir / f"{stem}.png", out_dir / f"{stem}.md"
    image = draw(runs, title)
    write_atomic(png, lambda tmp: image.save(tmp, format="PNG", optimize=True))
    write_text_atomic(md, markdown(runs, title, png.name))
    return png, md
