"""Score generated images: FID, sFID, Inception Score, precision/recall (ADM's protocol) and KID.

    python eval_fid.py samples=samples/run.npz reference=VIRTUAL_imagenet256_labeled.npz
    python eval_fid.py checkpoint=run/ckpt.pt bulk.num_samples=10000 reference=...   # generate, then score
    python eval_fid.py samples=... reference=real_toy/ feature_extractor=toy_judge   # the quickstart's judge

Every option, with its default, is in conf/eval.yaml (which includes conf/sample.yaml for
generating); the metrics live in dit/metrics.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dit.checkpoint import write_text_atomic
from dit.distributed import env_rank
from dit.metrics import append_results_row, build_feature_extractor, compute_metrics, load_reference, read_images
from dit.runtime import tune_host_allocator
from dit.sampling import settings_path_for

KNOWN_METRICS = ("fid", "sfid", "isc", "prc", "kid")


def evaluate(cfg: DictConfig, samples: str | os.PathLike) -> dict:
    """Score `samples` against `cfg.reference`; print, write JSON, append to the results table and
    log to wandb when enabled. Returns the record written."""
    wanted = set(cfg.metrics)
    if wanted - set(KNOWN_METRICS):
        raise ValueError(f"unknown metrics {sorted(wanted - set(KNOWN_METRICS))}: choose from {KNOWN_METRICS}")
    samples = Path(samples).expanduser()
    images, labels = read_images(samples)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    extractor = build_feature_extractor(
        cfg.feature_extractor, weights=cfg.feature_extractor_weights, device=cfg.device,
        batch_size=int(cfg.feature_batch_size), allow_download=bool(cfg.allow_download), image_size=images.shape[1],
        judge_cache_dir=str(cache_dir) if cache_dir else None, judge_seed=int(cfg.judge_seed))
    reference = load_reference(cfg.reference, extractor, cache_dir=cache_dir / "ref_stats" if cache_dir else None,
                               need_features=bool(wanted & {"prc", "kid"}), progress=True)
    metrics = compute_metrics(
        images, reference, extractor, labels=labels, progress=True, fid="fid" in wanted, sfid="sfid" in wanted,
        isc="isc" in wanted, prc="prc" in wanted, kid="kid" in wanted, prc_k=int(cfg.prc_k),
        isc_split_size=int(cfg.isc_split_size), kid_subsets=int(cfg.kid_subsets),
        kid_subset_size=int(cfg.kid_subset_size))

    sidecar = settings_path_for(samples) if samples.is_file() else None
    settings = json.loads(sidecar.read_text()) if sidecar is not None and sidecar.is_file() else {}
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "samples": str(samples),
        "reference": str(cfg.reference),
        "feature_extractor": extractor.identity,
        "metrics": metrics,
        "sampling": settings,  # what sample.py recorded next to the samples (empty for other sources)
    }
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")

    out_json = Path(cfg.results_json) if cfg.results_json else samples.with_name(
        f"{samples.stem if samples.is_file() else samples.name}.{cfg.feature_extractor}.metrics.json")
    write_text_atomic(out_json, json.dumps(record, indent=2, default=str) + "\n")
    row = {**{k: settings.get(k) for k in ("checkpoint", "step", "sampler", "num_steps", "cfg_scale",
                                           "guided_channels", "guidance_interval", "vae", "seed", "labels")},
           **metrics, "time": record["time"], "samples": str(samples), "reference": str(cfg.reference),
           "feature_extractor": extractor.identity}
    if cfg.results_table:
        append_results_row(cfg.results_table, row)
    print(f"wrote {out_json}" + (f"; appended a row to {cfg.results_table}" if cfg.results_table else ""))

    if cfg.wandb.mode != "disabled":
        import wandb

        run = wandb.init(mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity, job_type="eval",
                         config={"sampling": settings, "reference": str(cfg.reference),
                                 "feature_extractor": extractor.identity, "samples": str(samples)})
        run.log({f"eval/{k}": v for k, v in metrics.items()})
        run.finish()
    return record


@hydra.main(config_path="conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    samples = cfg.samples
    if samples is None:
        if cfg.checkpoint is None:
            raise ValueError("give samples=PATH (an ADM .npz or a folder of images), or checkpoint=PATH to generate "
                             "them first with the sampling settings of conf/sample.yaml")
        from sample import generate_bulk  # the same code path as `python sample.py mode=bulk`

        samples = generate_bulk(cfg)
        if env_rank() != 0:
            return  # every rank sampled; rank 0 scores
    evaluate(cfg, samples)


if __name__ == "__main__":
    tune_host_allocator()  # reuse freed host memory: no page faults per batch (dit/runtime.py)
    main()
