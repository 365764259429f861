"""Score generated images: FID, sFID, Inception Score, precision/recall (ADM's protocol) and KID.

    python eval_fid.py samples=samples/run.npz reference=VIRTUAL_imagenet256_labeled.npz
    python eval_fid.py checkpoint=run/ckpt.pt bulk.num_samples=10000 reference=...   # generate, then score
    python eval_fid.py samples=... reference=real_toy/ feature_extractor=toy_judge   # the quickstart's judge

Every option, its type and its default: dit/config/sample.py (EvalConfig, which includes all of
sample.py's keys for generating); the work is done by dit/evaluate.py, the metrics live in
dit/metrics.py.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dit.config import flatten_model_overrides, register_configs
from dit.evaluate import generate_and_evaluate
from dit.runtime import tune_host_allocator

register_configs()  # before hydra composes conf/eval.yaml, also when this file is imported


@hydra.main(config_path="conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    generate_and_evaluate(cfg)


if __name__ == "__main__":
    tune_host_allocator()  # reuse freed host memory: no page faults per batch (dit/runtime.py)
    sys.argv = flatten_model_overrides(sys.argv)
    main()
