"""The second reliability attack (issue 21) on how `train.py` ends and starts: an error inside a
DataLoader worker (item 6), a FIFO among the images (item 8), a preemption signal in the first
seconds (item 13). Each test reproduces the attack on the tiny run of conftest.TINY_MODEL in a
real `train.py` process (the exit status and the hang are what is at stake), with a timeout, so
that a hang fails the test instead of stopping the suite. What each case guarantees:
docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL

# An ImageFolder of 16x16 toy images (40: 4 per class), 8 a step: 5 steps per epoch.
IMAGE_RUN = [*TINY_MODEL, "data=imagefolder", "data.image_size=16", "global_batch_size=8", "log.every=1",
             "log.samples.every=0", "ckpt.every_minutes=null"]


def toy_folder(root: Path) -> Path:
    from dit.data.toy import write_toy_imagefolder

    return write_toy_imagefolder(root, num_per_class=4, image_size=16)


def train_py(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`python train.py <IMAGE_RUN> <overrides>` into tmp_path/run, stdout and stderr in one pipe."""
    command = [sys.executable, str(REPO / "train.py"), *IMAGE_RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """(output, seconds) of `proc` once it exits; kills it and fails when it runs past `timeout`."""
    began = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"train.py was still running after {timeout:.0f} s:\n{output[-3000:]}")
    return output, time.monotonic() - began


# --------------------------------------------------------------------------------------
# 6. An error inside a DataLoader worker
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_truncated_image_read_by_a_loader_worker_ends_train_py_with_one_line_naming_it(tmp_path):
    """The commonest real fault: a truncated PNG, read in a DataLoader worker (which ignores the
    preemption signals). The error line used to print and the process to live forever (the
    workers, held by the exception's traceback, were sent SIGTERM at exit and waited for). Now
    the workers are stopped: status 1 within 60 s, one line naming the file and the fix."""
    data = toy_folder(tmp_path / "data")
    bad = sorted(data.rglob("*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:60])  # the header and half a chunk
    proc = train_py(tmp_path, f"data.root={data}", "data.num_workers=2", "max_steps=10")
    output, took = finished(proc, timeout=120)
    assert proc.returncode == 1, output[-3000:]
    assert took < 60, took  # start-up included
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0] and "skip_bad" in errors[0], output[-3000:]
    assert "Traceback" not in output and "DataLoader worker" not in errors[0], output[-3000:]


# --------------------------------------------------------------------------------------
# 8. A FIFO named like an image
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fifos_named_like_images_are_never_indexed_so_never_opened(tmp_path):
    """A FIFO `*.png` in a class folder: first in its class, `data_identity`'s read at start-up
    blocked forever; further on, the DataLoader worker that drew it did, at a later step. Only
    regular files are indexed (a link to a FIFO is followed and refused too), each skipped entry
    named in a warning; the scoring side's folders (`image_files`) list regular files only."""
    import warnings

    from dit.data.images import ImageFolderDataset
    from dit.io.images import image_files

    data = toy_folder(tmp_path / "data")
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    first = classes[0] / "000.png"  # sorts before 000000.png: the file data_identity reads
    later = classes[3] / "zzz.png"  # sorts last: read by a worker in the epoch
    outside = tmp_path / "pipe"
    linked = classes[5] / "link.png"
    for fifo in (first, later, outside):
        os.mkfifo(fifo)
    linked.symlink_to(outside)
    planted = [first, later, linked]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(data, 16)
    assert len(ds) == 40 and not {str(p) for p in planted} & {path for path, _ in ds.samples}
    for p in planted:
        assert any(str(p) in str(w.message) and "not a regular file" in str(w.message) for w in caught), p
    assert not set(planted) & set(image_files(data))

    proc = train_py(tmp_path, f"data.root={data}", "data.num_workers=1", "max_steps=6")  # every item, and one more
    output, _ = finished(proc, timeout=120)
    assert proc.returncode == 0, output[-3000:]
    for p in planted:
        assert f"not indexing {p}" in output, (p, output[-3000:])
