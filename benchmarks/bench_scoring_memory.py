"""Peak memory of scoring an ADM `.npz` (FID only): the streamed path (`dit.scoring.images.NpzImages`
read batch by batch, statistics accumulated on the fly) against the in-memory path of before
(the whole `arr_0` read by `read_samples_npz`, every image's features extracted and kept, then
`np.cov`), each in a fresh subprocess.

    python benchmarks/bench_scoring_memory.py                         # 20 000 images, 64 px (246 MB), toy judge
    python benchmarks/bench_scoring_memory.py --extractor inception --num-images 1000 --weights W.pth
    python benchmarks/bench_scoring_memory.py --json benchmarks/results/scoring_memory_cpu.json

Each child sets the host allocator as eval_fid.py does (`dit.cli.runtime.tune_host_allocator`: freed
memory stays in the heap for the next batch), builds the extractor, loads the reference statistics and runs one warm-up batch (so the
network's activation memory is in place), then resets the kernel's resident-set high-water mark
(`/proc/self/clear_refs`, VmHWM in /proc/self/status) and takes the current RSS as the baseline,
scores the file, and reads the high-water mark: the increase is what scoring N images costs on
top of a loaded extractor. It is printed as a ratio of the array's size (N x H x W x 3 bytes), and the
ratio streamed / in-memory last. The file is written by the parent; the children read it with
plain file reads, whose page cache is not resident memory of the process.

Inception on 20 000 images takes far longer than a few minutes on a 2-core CPU, so the default
extractor is the quickstart's toy judge (`feature_extractor=toy_judge`: a small CNN, D = 64,
trained once for 64 px by the parent and cached in a temporary folder, so that neither child's
baseline holds a training peak); `--extractor inception` with
`--weights` (e.g. a random-weights file from `tests/conftest.py`'s
`write_random_inception_weights`) measures the real network, D = 2048, on a smaller N.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dit and benchmarks packages

from benchmarks.common import machine_info  # noqa: E402
from dit.scoring import metrics as M  # noqa: E402
from dit.scoring.extractors import build_feature_extractor  # noqa: E402
from dit.io.npz import StreamedArray, read_samples_npz, write_npz_atomic  # noqa: E402
from dit.scoring.images import open_images  # noqa: E402
from dit.cli.runtime import tune_host_allocator  # noqa: E402


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        sys.exit(f"/proc/self/status has no {field}: this benchmark reads Linux's memory counters")
    return int(match.group(1)) * 1024


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS and return that RSS: what a
    later peak is measured from. Unlike getrusage's lifetime maximum, a transient peak before the
    reset (loading the reference, the warm-up batch) cannot hide what scoring itself costs."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (Linux >= 4.0, proc(5))
    return _status_bytes("VmRSS")


def build_extractor(args):
    extractor = build_feature_extractor(
        "toy_judge" if args.extractor == "judge" else "inception", weights=args.weights, device=args.device,
        batch_size=args.batch_size, allow_download=False, image_size=args.image_size, judge_cache_dir=args.cache_dir)
    # Images per forward pass, for both extractors (the judge's own default is 500, whose 64 px
    # activations, ~180 MB, are served by fresh mmaps each batch: a per-batch cost that has
    # nothing to do with how many images are scored, and would drown the figure measured here).
    extractor.batch_size = args.batch_size
    return extractor


def child(args) -> dict:
    tune_host_allocator()  # as eval_fid.py does first: freed batch memory is kept and reused, not re-faulted
    torch.set_num_threads(args.threads)
    extractor = build_extractor(args)
    reference = M.load_reference(args.reference, extractor, need_features=False)
    before_warmup = reset_peak_rss()
    with open_images(args.samples)[0] as source:  # warm-up: one batch through the network
        extractor.extract(source.read(0, min(len(source), extractor.batch_size)))
    one_batch = _status_bytes("VmHWM") - before_warmup  # what one batch costs: the floor of any scoring
    baseline = reset_peak_rss()
    start = time.perf_counter()
    options = M.MetricOptions(fid=True, sfid=False, isc=False, prc=False)
    with torch.no_grad():
        if args.child == "streamed":  # what eval_fid.py runs now
            source = open_images(args.samples)[0]
            metrics = M.compute_metrics(source, reference, extractor, options)
        else:  # the path of before: the whole array, every image's outputs kept, then np.cov
            images = read_samples_npz(args.samples)[0]
            feats = M.sample_features(images, extractor)
            metrics = M.metrics_from_features(feats, reference, extractor.identity, options,
                                              image_size=images.shape[1:3])
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"path": args.child, "baseline_rss": baseline, "peak_rss": peak, "increase": peak - baseline,
            "one_batch_increase": one_batch, "fid": metrics["fid"], "seconds": seconds,
            "images_per_s": metrics["num_samples"] / seconds, "extractor": extractor.identity}


def write_random_npz(path: Path, n: int, size: int, seed: int) -> None:
    """uint8 images written in chunks (StreamedArray), so the parent never holds the array either."""
    rng = np.random.default_rng(seed)
    chunk = 1000

    def chunks():
        for start in range(0, n, chunk):
            yield rng.integers(0, 256, (min(chunk, n - start), size, size, 3), dtype=np.uint8)

    write_npz_atomic(path, {"arr_0": StreamedArray((n, size, size, 3), np.dtype(np.uint8), chunks())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--reference-images", type=int, default=500)
    parser.add_argument("--extractor", choices=("judge", "inception"), default="judge")
    parser.add_argument("--weights", default=None, help="Inception weights file (--extractor inception)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (feature_batch_size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the .npz files go (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--_child", dest="child", choices=("streamed", "in_memory"), default=None)
    parser.add_argument("--_samples", dest="samples", default=None)
    parser.add_argument("--_reference", dest="reference", default=None)
    parser.add_argument("--_cache", dest="cache_dir", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        samples, reference = tmp / "samples.npz", tmp / "reference.npz"
        write_random_npz(samples, args.num_images, args.image_size, seed=0)
        write_random_npz(reference, args.reference_images, args.image_size, seed=1)
        array_bytes = args.num_images * args.image_size ** 2 * 3
        args.cache_dir = str(tmp / "cache")
        build_extractor(args)  # the toy judge is trained here, once: the children load it (no training peak)
        common = [sys.executable, __file__, "--extractor", args.extractor, "--device", args.device,
                  "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--image-size",
                  str(args.image_size), "--_samples", str(samples), "--_reference", str(reference),
                  "--_cache", str(tmp / "cache")] + (["--weights", args.weights] if args.weights else [])
        runs = {}
        for path in ("streamed", "in_memory"):
            proc = subprocess.run(common + ["--_child", path], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {path} child failed:\n{proc.stderr[-4000:]}")
            runs[path] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = runs[path]
            print(f"{path:>10}: peak RSS +{r['increase'] / 2**20:8.1f} MiB = {r['increase'] / array_bytes:.3f} of the "
                  f"array ({array_bytes / 2**20:.0f} MiB); one warm-up batch +{r['one_batch_increase'] / 2**20:.1f} MiB; "
                  f"baseline {r['baseline_rss'] / 2**20:.0f} MiB; "
                  f"{r['images_per_s']:.0f} images/s; FID {r['fid']:.6f}")
    ratio = runs["streamed"]["increase"] / runs["in_memory"]["increase"]
    fid_rel = abs(runs["streamed"]["fid"] - runs["in_memory"]["fid"]) / abs(runs["in_memory"]["fid"])
    print(f"streamed / in-memory peak increase: {ratio:.3f}; FID relative difference {fid_rel:.2e}")
    result = {"num_images": args.num_images, "image_size": args.image_size, "array_bytes": array_bytes,
              "extractor": args.extractor, "batch_size": args.batch_size, "runs": runs,
              "increase_over_array": {k: v["increase"] / array_bytes for k, v in runs.items()},
              "ratio_streamed_over_in_memory": ratio, "fid_relative_difference": fid_rel,
              "machine": machine_info(args.device, threads=args.threads)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
