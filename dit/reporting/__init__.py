"""Runs compared as a picture and a table (`python -m dit.report`, dit/cli/report.py):

- `runs`: the run directories under some paths (each holds the trainer's `metrics.jsonl`), their
  loss and evaluation curves, labels from the swept values (`.hydra/overrides.yaml`);
- `charts`: line charts drawn with PIL (panels, a figure of panels with a legend);
- `compare`: the comparison figure (loss and each evaluation metric against the step), the table
  of final and best scores, both written to files.
"""

from dit.reporting.compare import write_report
from dit.reporting.runs import Run, load_run, load_runs

__all__ = ["Run", "load_run", "load_runs", "write_report"]
