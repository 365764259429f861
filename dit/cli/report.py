"""`python -m dit.report`: runs compared as one picture and one table.

    python -m dit.report multirun                          # every run of a sweep: multirun/report.png, report.md
    python -m dit.report outputs/a outputs/b --out /tmp/c  # any runs, the report elsewhere

Each path is a run directory (where train.py writes `metrics.jsonl`), a folder with runs anywhere
below it (a `-m` sweep's folder), or a metrics.jsonl file. The runs are labelled by the values
swept between them (the overrides of their `.hydra/overrides.yaml` that differ, e.g.
`optim.lr=0.002`), else by their folders. It writes `report.png` (the training loss, smoothed, and
each evaluation metric against the step, one line per run) and `report.md` (per run the last step,
the final loss, and each metric's final and best value with its step), and prints the table.
By default both go into the one path given, or the folder the paths share.

A path without runs ends in one line, `error: ...`, and exit status 1 (as the other programs,
dit/cli/errors.py); HYDRA_FULL_ERROR=1 shows the traceback instead. This program reads JSON and
draws with PIL only: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dit.reporting import load_runs, write_report
from dit.reporting.compare import table


def default_out(paths: list[str], parser: argparse.ArgumentParser) -> Path:
    """The one directory given (a metrics.jsonl file: its run), else the folder the paths share,
    unless that is the current directory or above it (the checkout): then --out is needed."""
    dirs = [Path(p).parent if Path(p).is_file() else Path(p) for p in paths]
    if len(dirs) == 1:
        return dirs[0]
    common = Path(os.path.commonpath([d.resolve() for d in dirs]))
    if common in (Path.cwd(), *Path.cwd().parents):
        parser.error(f"the runs share no folder below the current one ({common}): say where the report goes "
                     "with --out DIR")
    return common


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dit.report", description="Runs compared: their curves in one PNG, "
                                     "their final and best scores in a markdown table.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, sweep folders (searched for metrics.jsonl) "
                                                  "or metrics.jsonl files")
    parser.add_argument("--out", default=None, help="where report.png and report.md go (default: the one path "
                                                    "given, or the folder the paths share)")
    parser.add_argument("--title", default=None, help="the picture's title (default: the paths)")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    out = Path(args.out) if args.out else default_out(args.paths, parser)
    title = args.title or f"{len(runs)} run{'s' * (len(runs) != 1)}: {', '.join(args.paths)}"
    png, md = write_report(runs, out, title)
    print(table(runs))
    for run in runs:
        if run.unreadable_lines:
            print(f"{run.path / 'metrics.jsonl'}: skipped {run.unreadable_lines} unreadable line(s)")
    print(f"wrote {png} and {md}", flush=True)
    return {"runs": runs, "png": png, "md": md}


def run() -> None:
    """The program: a known failure (a path without runs, a file that cannot be written) in one line."""
    try:
        main()
    except OSError as err:
        if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
