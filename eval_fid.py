"""Score generated images: FID, sFID, Inception Score, precision/recall (ADM's protocol) and KID.

    python eval_fid.py samples=outputs/samples/run.npz reference=VIRTUAL_imagenet256_labeled.npz
    python eval_fid.py checkpoint=run/ckpt.pt bulk.num_samples=10000 reference=...   # generate, then score
    python eval_fid.py samples=... reference=real_toy/ feature_extractor=toy_judge   # the quickstart's judge

Every option, its type and its default: dit/config/sample.py (EvalConfig, which includes all of
sample.py's keys for generating); the work is done by dit/cli/eval_fid.py with dit/scoring/evaluator.py,
the metrics live in dit/scoring/metrics.py.
"""

# The program lives in dit/cli/eval_fid.py (also the installed console script); this file keeps
# `python eval_fid.py ...` working in a checkout.
from dit.cli.eval_fid import main, run  # noqa: F401  (main: hydra's entry, importable as before)

if __name__ == "__main__":
    run()
