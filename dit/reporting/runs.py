"""Training runs as the report reads them: every run directory under the given paths (a folder
holding `metrics.jsonl`, the trainer's one JSON line per logged step: `train/loss`, ..., and
`eval/<metric>` lines at evaluation steps), its loss and evaluation curves, and a label: the
values swept between the runs (the overrides in `.hydra/overrides.yaml` that differ), else the
folder names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import yaml

METRICS_FILE = "metrics.jsonl"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
LOSS_KEY = "train/loss"
EVAL_PREFIX = "eval/"
# eval/ keys that count or time an evaluation instead of scoring it: not drawn, not in the table.
NOT_SCORES = {"num_samples", "num_reference", "num_reference_fid", "num_reference_pr", "seconds"}


@dataclasses.dataclass
class Run:
    """One run: its folder, label, command-line overrides (None: no `.hydra/overrides.yaml`),
    training loss and evaluation scores as (step, value) in step order, the last logged step and
    the metrics lines that could not be read (a line cut short by a crash)."""

    path: Path
    label: str
    overrides: Optional[list[str]]
    loss: list[tuple[int, float]]
    scores: dict[str, list[tuple[int, float]]]
    last_step: int
    unreadable_lines: int = 0


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The run directories in `paths`: each path a run directory, its metrics.jsonl, or a folder
    with runs anywhere below it (a multirun sweep folder), in path order then sorted. A path with
    none raises FileNotFoundError naming it."""
    return [run for _, run in _find_runs(paths)]


def _find_runs(paths: Iterable[str | os.PathLike]) -> list[tuple[int, Path]]:
    """(index of the path it was found under, run directory) for `find_run_dirs`."""
    found: list[Path] = []
    where: list[int] = []
    for index, given in enumerate(paths):
        path = Path(given)
        if path.is_file() and path.name == METRICS_FILE:
            runs = [path.parent]
        elif path.is_dir():
            runs = sorted(p.parent for p in path.rglob(METRICS_FILE) if p.is_file())
        else:
            runs = []
        if not runs:
            what = "does not exist" if not path.exists() else f"has no {METRICS_FILE} in it or below it"
            raise FileNotFoundError(f"{given} {what}: give a run directory (where train.py writes {METRICS_FILE}), "
                                    "a sweep's folder (multirun/...) or a metrics.jsonl file")
        for run in runs:
            if run not in found:
                found.append(run)
                where.append(index)
    return list(zip(where, found))


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The readable lines of a metrics file as dicts with a numeric `step`, and how many lines
    were not (cut short by a crash or a full disk, not UTF-8, not JSON)."""
    rows, bad = [], 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            step = row["step"]
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            bad += 1
            continue
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            bad += 1
            continue
        rows.append(row)
    return rows, bad


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def curves(rows: list[dict]) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(loss curve, {metric: curve}) from metrics lines: a value per step (a later line for the
    same step and key wins), in step order; metric names without their `eval/` prefix."""
    loss: dict[int, float] = {}
    scores: dict[str, dict[int, float]] = {}
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            v = _number(value)
            if v is None:
                continue
            if key == LOSS_KEY:
                loss[step] = v
            elif key.startswith(EVAL_PREFIX):
                name = key[len(EVAL_PREFIX):]
                if name not in NOT_SCORES and not name.endswith("_std"):
                    scores.setdefault(name, {})[step] = v
    return sorted(loss.items()), {k: sorted(v.items()) for k, v in scores.items()}


def read_overrides(run_dir: Path) -> Optional[list[str]]:
    """The run's command-line overrides as train.py recorded them, or None."""
    path = run_dir / OVERRIDES_FILE
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _pairs(overrides: list[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        out[key] = value if sep else ""
    return out


def swept_labels(overrides: list[Optional[list[str]]]) -> Optional[list[str]]:
    """Per run, the overrides whose value differs between the runs (`optim.lr=0.002`, in the
    order they first appear; `key=` marks a key another run sets and this one does not), or
    None when some run has no record, nothing differs, or two runs would get the same label."""
    if len(overrides) < 2 or any(o is None for o in overrides):
        return None
    pairs = [_pairs(o) for o in overrides]  # type: ignore[arg-type]
    keys = list(dict.fromkeys(k for p in pairs for k in p))
    differing = [k for k in keys if len({p.get(k) for p in pairs}) > 1]
    if not differing:
        return None
    labels = [",".join(f"{k}={p[k]}" if k in p else f"{k}=(unset)" for k in differing) for p in pairs]
    return labels if len(set(labels)) == len(labels) else None


def folder_labels(run_dirs: list[Path]) -> list[str]:
    """Per run, its folder relative to the folder the runs share (its name if there is one run)."""
    if len(run_dirs) == 1:
        return [run_dirs[0].resolve().name]
    resolved = [d.resolve() for d in run_dirs]
    common = Path(os.path.commonpath(resolved))
    return [str(d.relative_to(common)) if d != common else d.name for d in resolved]


def load_run(run_dir: str | os.PathLike, label: str, overrides: Optional[list[str]] = None) -> Run:
    """One run directory read (no metrics.jsonl: a run with no curves yet)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    rows, bad = read_metrics(path) if path.is_file() else ([], 0)
    loss, scores = curves(rows)
    last = max((int(r["step"]) for r in rows), default=0)
    return Run(run_dir, label, overrides, loss, scores, last, bad)


def natural_key(label: str) -> tuple:
    """A sort key that orders swept values as numbers where they are numbers (1e-4 before 0.001)."""
    out = []
    for item in label.split(","):
        key, _, value = item.partition("=")
        try:
            out.append((key, 0, float(value), ""))
        except ValueError:
            out.append((key, 1, 0.0, value))
    return tuple(out)


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Every run under `paths` (`find_run_dirs`), read and labelled; the runs found under one
    path in the order of their swept values (else of their folders), the paths in the order given."""
    found = _find_runs(paths)
    run_dirs = [run for _, run in found]
    overrides = [read_overrides(d) for d in run_dirs]
    swept = swept_labels(overrides)
    labels = swept or folder_labels(run_dirs)
    order = sorted(range(len(found)), key=lambda i: (found[i][0], natural_key(labels[i]) if swept else ()))
    return [load_run(run_dirs[i], labels[i], overrides[i]) for i in order]


def finite(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if math.isfinite(v)]
