"""The results table: one CSV row per evaluation that eval_fid.py scores, so pandas, or `sort -g`
on the FID column, can rank runs.

    append_results_row("results/eval_results.csv", results_row(record))   # record: eval_fid's JSON
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from dit.io.atomic import FileWriteError, atomic_target, write_text_atomic
from dit.sampling.settings import DEFAULT_GUIDANCE, SETTINGS_FIELDS

METRIC_COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "kid", "class_accuracy")
# A sampler setting named like a metric (SamplerSettings.precision, the sampling arithmetic, vs the
# precision of precision/recall) gets its column under a prefix: one column per name.
SETTINGS_COLUMNS = {f: f"sampling_{f}" if f in METRIC_COLUMNS else f for f in SETTINGS_FIELDS}
# guidance=autoguidance: the guide model's checkpoint (the settings record's `guide`); its method and
# APG's knobs are settings columns (`guidance` says cfg for our samples recorded without it).
RESULTS_COLUMNS = (
    "time", "checkpoint", "step", *SETTINGS_COLUMNS.values(), "guide_checkpoint", "vae", "num_samples", "seed",
    "labels",
    "feature_extractor", "reference", *METRIC_COLUMNS,
    "num_reference_fid", "num_reference_pr", "feature_precision", "pr_arithmetic", "samples",
)


def results_row(record: dict) -> dict:
    """The table's row of an eval_fid.py record (its results JSON): what sample.py recorded about
    the samples, the metrics, and how they were scored."""
    settings, scoring = record["sampling"], record["scoring"]
    guide = settings.get("guide") or {}
    # A settings record states the guidance method only when it is not cfg (the default).
    method = settings.get("guidance", DEFAULT_GUIDANCE if "sampler" in settings else None)
    return {**{SETTINGS_COLUMNS.get(k, k): settings.get(k)
               for k in ("checkpoint", "step", *SETTINGS_FIELDS, "vae", "seed", "labels")},
            "guidance": method, "guide_checkpoint": guide.get("checkpoint"),
            **record["metrics"], "time": record["time"], "samples": record["samples"],
            "reference": record["reference"], "feature_extractor": record["feature_extractor"],
            "feature_precision": scoring["feature_precision"], "pr_arithmetic": scoring["pr_arithmetic"]}


def append_results_row(path: str | os.PathLike, row: dict) -> Path:
    """Append one evaluation to a CSV table (header written once; columns `RESULTS_COLUMNS`).
    Unknown keys are ignored, missing ones left empty. A table written before a column was added
    (a new sampler setting, say) is first rewritten, atomically, with the new header and its rows'
    new cells empty; a table with columns this code does not know is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_header = True
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else None
        if header is not None and tuple(header) != RESULTS_COLUMNS:
            unknown = [c for c in header if c not in RESULTS_COLUMNS]
            if unknown:
                raise ValueError(f"results table {path} has columns {unknown} that this code does not write: "
                                 "move it aside or pass another results_table path")
            _rewrite_table(path, [dict(zip(header, r)) for r in rows[1:]])
        write_header = header is None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULTS_COLUMNS, extrasaction="ignore")
    if write_header:
        writer.writeheader()
    writer.writerow({k: _cell(row.get(k)) for k in RESULTS_COLUMNS})
    target = atomic_target(path)  # through a symlink; never into a device or FIFO
    try:
        with open(target, "a", newline="") as f:  # one write: concurrent appends do not interleave lines
            f.write(buf.getvalue())
    except OSError as err:
        raise FileWriteError(path, err, kept="The rows already in it are kept (a cut last line may end it)") from err
    return path


def _rewrite_table(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULTS_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)
