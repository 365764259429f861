"""What the latents cache's content check costs at start-up (issue 21, item 3): opening a cache
whose meta.json records each shard's SHA-256 (every shard read and hashed) against opening the
same cache without the digests (a cache built before them), in the same run.

    python benchmarks/bench_cache_fingerprint.py                  # ~1 GiB cache, ~1-2 min on 2 cores
    python benchmarks/bench_cache_fingerprint.py --gib 4 --json benchmarks/results/cache_fingerprint_cpu.json

The cache is built by `build_latent_cache` from a temporary ImageFolder of random images, through
a stand-in autoencoder that stores what a VAE cache stores (a float32 mean and a float16 std, of
each image and its mirror) but at pixel resolution, so that a GiB of cache needs only a few
hundred images. Shards of about 190 MiB, like a 256 px SD-VAE cache's (4096 images of 48 KiB).

Timed, alternately, `--repeats` times each:
  digest:      `shard_digest` of every shard, one thread (the raw SHA-256 speed over the files);
  with:        `LatentCacheDataset(cache)` of the cache as built (every shard's digest checked,
               and its arrays: shapes, dtypes, labels, finite values);
  without:     `LatentCacheDataset(copy)`, the same shards under a meta.json without digests (a
               cache built before them: the arrays are checked all the same).
Warm: the shards in the page cache. Cold (`--cold`, the default too): each shard's pages dropped
first with posix_fadvise(DONTNEED) (no root needed), so the disk is read as at a first start-up.
Prints seconds per GiB (median, min-max) and MB/s of each, wall-clock and CPU time of the process
(all threads; on a shared machine the wall time grows with the others' load, the CPU time hardly),
and the difference with - without.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, summary  # noqa: E402

from dit.autoencoder import PixelAutoencoder  # noqa: E402
from dit.data import CacheFormat, CacheRun, LatentCacheDataset, build_latent_cache  # noqa: E402
from dit.data.latents import shard_digest  # noqa: E402


class PixelMoments(PixelAutoencoder):
    """The images as the mean and a positive std: a VAE cache's arrays and dtypes, at pixel size."""

    def encode_moments(self, images):
        return images, 0.01 + 0.1 * images.abs()


def make_image_folder(root: Path, num_images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png",
                                                                                     compress_level=1)


def drop_from_page_cache(files) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="cache size to build")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="where to build the cache (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    per_image = 2 * 3 * args.image_size ** 2 * (4 + 2)  # two views, float32 mean + float16 std
    num_images = max(2, int(args.gib * 2 ** 30 / per_image))
    shard_size = max(1, (190 << 20) // per_image)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        make_image_folder(tmp / "images", num_images, args.image_size)
        t0 = time.perf_counter()
        cache = build_latent_cache(tmp / "images", PixelMoments(), tmp / "cache", args.image_size,
                                   fmt=CacheFormat(shard_size=shard_size),
                                   run=CacheRun(batch_size=16, num_workers=0, device="cpu", progress=False))
        build_s = time.perf_counter() - t0
        shutil.rmtree(tmp / "images")
        shards = sorted(cache.glob("shard_*.pt"))
        nbytes = sum(p.stat().st_size for p in shards)
        # The same shards under a meta.json without digests: a cache built before them.
        old = tmp / "old"
        old.mkdir()
        meta = json.loads((cache / "meta.json").read_text())
        meta["shards"] = [{"file": s["file"], "count": s["count"]} for s in meta["shards"]]
        (old / "meta.json").write_text(json.dumps(meta))
        for p in shards:
            os.link(p, old / p.name)  # the same files: the page cache is shared

        variants = {
            "digest": lambda: [shard_digest(p) for p in shards],
            "with": lambda: LatentCacheDataset(cache),
            "without": lambda: LatentCacheDataset(old),
        }
        times = {f"{name} {state}": [] for state in ("warm", "cold") for name in variants}
        cpu = {key: [] for key in times}  # CPU seconds of this process (all threads): what load does not inflate
        for name, f in variants.items():  # warm-up: page cache filled, imports done
            f()
        for _ in range(args.repeats):
            for state in ("warm", "cold"):
                for name, f in variants.items():
                    if state == "cold":
                        drop_from_page_cache(shards)
                    t, c = time.perf_counter(), time.process_time()
                    f()
                    times[f"{name} {state}"].append(time.perf_counter() - t)
                    cpu[f"{name} {state}"].append(time.process_time() - c)

    gib = nbytes / 2 ** 30
    print(f"cache: {len(shards)} shards, {nbytes / 2 ** 20:.0f} MiB ({num_images} images of {args.image_size} px with "
          f"mirrors, float32 mean + float16 std), built in {build_s:.1f} s; {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs")
    results = {}
    for key, values in times.items():
        per_gib = [v / gib for v in values]
        results[key] = {"s_per_gib": summary(per_gib), "mb_per_s": nbytes / 1e6 / statistics.median(values),
                        "cpu_s_per_gib": summary(v / gib for v in cpu[key])}
        s, c = results[key]["s_per_gib"], results[key]["cpu_s_per_gib"]
        print(f"{key:>13}: {s['median']:.3f} s/GiB ({s['min']:.3f}-{s['max']:.3f}), "
              f"{results[key]['mb_per_s']:.0f} MB/s; CPU {c['median']:.3f} s/GiB ({c['min']:.3f}-{c['max']:.3f})")
    for state in ("warm", "cold"):
        extra = statistics.median(times[f"with {state}"]) - statistics.median(times[f"without {state}"])
        results[f"check cost {state}"] = extra / gib
        extra_cpu = statistics.median(cpu[f"with {state}"]) - statistics.median(cpu[f"without {state}"])
        results[f"check cpu cost {state}"] = extra_cpu / gib
        print(f"start-up cost of the digests ({state}): {extra / gib:.3f} s/GiB wall, {extra_cpu / gib:.3f} s/GiB CPU "
              "(with - without, medians)")
    if args.json:
        out = {"machine": machine_info("cpu"), "cache_bytes": nbytes, "shards": len(shards),
               "num_images": num_images, "image_size": args.image_size, "repeats": args.repeats, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
