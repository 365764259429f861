"""Issue 23, items 3, 4 and 6: sample.py's defaults fit any model and any checkout.

- item 3: without `grid.labels` the grid draws the model's own classes, one row of
  `grid.per_class` images per class (an even spread of `grid.max_classes` classes when the model
  has more); labels the model does not have are refused before the checkpoint is loaded, naming
  its class count and the fix;
- item 4: `checkpoint=<run directory>` samples the run's newest intact checkpoint (for sample.py
  and eval_fid.py) and names the file it used; a run directory without checkpoints is one error;
- item 6: the default outputs of sample.py and eval_fid.py (grid PNG, bulk .npz, metrics JSON,
  results table) go under `outputs/` of the working directory, nothing else is created there.
"""

import json
from pathlib import Path

import torch
from PIL import Image

from dit.io.checkpoint import save_atomic, with_checksum
from dit.sampling.loading import settings_path_for

from conftest import assert_one_line, run_program, tiny_dit

FAST = ["sampler=ddim", "sampler.num_steps=2", "device=cpu"]


def _checkpoint(path: Path, num_classes: int = 5, step: int = 11, seed: int = 0, **config) -> Path:
    """A tiny pixel-space DiT (8x8 images) in our checkpoint format, with its checksum, as training
    writes it."""
    model = tiny_dit(seed=seed, in_channels=3, num_classes=num_classes, input_size=8, **config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(with_checksum({"model": model.state_dict(), "ema": model.state_dict(), "step": step,
                               "model_name": None, "model_config": model.config.to_dict(),
                               "autoencoder": {"name": "pixel", "scale_factor": 1.0}, "format_version": 1}), path)
    return path


def _run_dir(root: Path) -> Path:
    """A run directory with two intact checkpoints (steps 10 and 20) and a newer one cut short (30)."""
    run = root / "myrun"
    _checkpoint(run / "checkpoints" / "0000010.pt", step=10, seed=1)
    _checkpoint(run / "checkpoints" / "0000020.pt", step=20, seed=2)
    intact = (run / "checkpoints" / "0000020.pt").read_bytes()
    (run / "checkpoints" / "0000030.pt").write_bytes(intact[: len(intact) // 2])  # a copy that stopped halfway
    return run


def _grid_size(rows: int, per_row: int, image: int = 8, padding: int = 2) -> tuple[int, int]:
    """(width, height) of a saved grid (torchvision's make_grid: `padding` around every image)."""
    return per_row * (image + padding) + padding, rows * (image + padding) + padding


# ------------------------------------------------------------------------------ item 3


def test_the_default_grid_draws_a_row_per_class_of_the_model(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "five.pt", num_classes=5)
    grid = tmp_path / "g.png"
    code, _, err = run_program("sample.py", [f"checkpoint={ckpt}", *FAST, f"grid.out={grid}"], capsys, monkeypatch)
    assert code == 0, err
    settings = json.loads(settings_path_for(grid).read_text())
    assert settings["classes"] == [0, 1, 2, 3, 4] and settings["per_class"] == 4 and settings["nrow"] == 4
    assert settings["labels"] == [y for y in range(5) for _ in range(4)]  # row y: four images of class y
    with Image.open(grid) as im:
        assert im.size == _grid_size(rows=5, per_row=4)

    code, _, err = run_program("sample.py", [f"checkpoint={ckpt}", *FAST, "grid.per_class=2", f"grid.out={grid}"],
                               capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(settings_path_for(grid).read_text())["labels"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with Image.open(grid) as im:
        assert im.size == _grid_size(rows=5, per_row=2)


def test_a_model_with_many_classes_gets_an_even_spread_and_dits_demo_stays_reachable(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "k1000.pt", num_classes=1000, hidden_size=16, num_heads=1)
    grid = tmp_path / "g.png"
    code, _, err = run_program("sample.py", [f"checkpoint={ckpt}", *FAST, "grid.per_class=1", f"grid.out={grid}"],
                               capsys, monkeypatch)
    assert code == 0, err
    classes = json.loads(settings_path_for(grid).read_text())["classes"]
    assert len(classes) == 16 and classes[0] == 0 and classes[-1] == 999  # grid.max_classes, both ends
    assert {b - a for a, b in zip(classes, classes[1:])} <= {66, 67}  # evenly spaced
    with Image.open(grid) as im:
        assert im.size == _grid_size(rows=16, per_row=1)

    demo = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py demo: one image each, 4 per row
    code, _, err = run_program("sample.py", [f"checkpoint={ckpt}", *FAST, f"grid.labels=[{','.join(map(str, demo))}]",
                                             f"grid.out={grid}"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(settings_path_for(grid).read_text())["labels"] == demo
    with Image.open(grid) as im:
        assert im.size == _grid_size(rows=2, per_row=4)


def test_labels_the_model_does_not_have_are_refused_before_its_weights_load(tmp_path, capsys, monkeypatch):
    import dit.sampling.generate as generate

    ours = _checkpoint(tmp_path / "five.pt", num_classes=5)
    release = tmp_path / "release.pt"  # a bare state dict (the release layout): 6 label rows, 5 classes + null
    torch.save(tiny_dit(in_channels=3, num_classes=5, input_size=8).state_dict(), release)
    run = _run_dir(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(generate, "load_for_sampling", never)
    for ckpt in (ours, release, run):
        code, _, err = run_program("sample.py", [f"checkpoint={ckpt}", *FAST, "grid.labels=[207,360]",
                                                 f"grid.out={tmp_path / 'g.png'}"], capsys, monkeypatch)
        assert_one_line(code, err, "grid.labels=[207, 360]", "class 207", "the 5 classes", str(ckpt),
                        "leave grid.labels out")
    assert not (tmp_path / "g.png").exists()


# ------------------------------------------------------------------------------ item 4


def test_sample_py_takes_a_run_directory_and_uses_its_newest_intact_checkpoint(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path)
    grid = tmp_path / "g.png"
    code, out, err = run_program("sample.py", [f"checkpoint={run}", *FAST, "grid.labels=[0,1]", f"grid.out={grid}"],
                                 capsys, monkeypatch)
    assert code == 0, err
    used = (run / "checkpoints" / "0000020.pt").resolve()
    assert f"sampling {used} (step 20)" in out  # the output names the file used
    settings = json.loads(settings_path_for(grid).read_text())
    assert settings["checkpoint"] == str(used) and settings["step"] == 20
    assert (run / "checkpoints" / "0000030.pt").is_file()  # skipped, left where it is (a run may own it)

    # Its checkpoints/ folder works too.
    code, out, err = run_program("sample.py", [f"checkpoint={run / 'checkpoints'}", *FAST, "grid.labels=[0,1]",
                                               f"grid.out={tmp_path / 'h.png'}"], capsys, monkeypatch)
    assert code == 0 and f"sampling {used} (step 20)" in out, err


def test_a_run_directory_without_a_readable_checkpoint_is_one_error(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    code, out, err = run_program("sample.py", [f"checkpoint={empty}", *FAST, "grid.labels=[0]",
                                               f"grid.out={tmp_path / 'g.png'}"], capsys, monkeypatch)
    assert_one_line(code, err, f"checkpoint={empty}", "directory without checkpoints")
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "0000005.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_program("sample.py", [f"checkpoint={broken}", *FAST, "grid.labels=[0]",
                                               f"grid.out={tmp_path / 'g.png'}"], capsys, monkeypatch)
    assert_one_line(code, err, f"checkpoint={broken}", "0000005.pt")
    assert not (tmp_path / "g.png").exists()


def test_resume_and_sample_py_find_a_run_directorys_checkpoints_alike(tmp_path):
    """resume= / init_from= (`resolve_resume_path`) and sample.py list a run directory's
    checkpoints with the same function."""
    from dit.io.checkpoint import newest_intact_checkpoint, run_checkpoints
    from dit.train.resume import resolve_resume_path

    run = _run_dir(tmp_path)
    assert [step for step, _ in run_checkpoints(run)] == [10, 20, 30]
    assert run_checkpoints(run) == run_checkpoints(run / "checkpoints")
    assert resolve_resume_path(str(run)) == run / "checkpoints" / "0000030.pt"  # unchanged: the newest file
    path, state, skipped = newest_intact_checkpoint(run)
    assert path == run / "checkpoints" / "0000020.pt" and state["step"] == 20
    assert [p.name for p, _ in skipped] == ["0000030.pt"]


# ------------------------------------------------------------------------------ item 6


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sample_py_writes_its_default_outputs_under_outputs(tmp_path, capsys, monkeypatch):
    """`python sample.py checkpoint=<run directory>` after training, from a checkout: one row per
    class, the grid and its settings under outputs/samples/, nothing else in the working directory."""
    run = _run_dir(tmp_path / "in")
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_program("sample.py", [f"checkpoint={run}", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert _files_under(work) == [f"outputs/samples/{name}" for name in (
        "myrun-0000020-ema-ddim2-cfg4-g3-seed0.png", "myrun-0000020-ema-ddim2-cfg4-g3-seed0.png.json")]
    assert f"wrote {Path('outputs/samples/myrun-0000020-ema-ddim2-cfg4-g3-seed0.png')}" in out
    with Image.open(work / "outputs/samples/myrun-0000020-ema-ddim2-cfg4-g3-seed0.png") as im:
        assert im.size == _grid_size(rows=5, per_row=4)  # a row per class of the model

    code, out, err = run_program("sample.py", [f"checkpoint={run}", *FAST, "mode=bulk", "bulk.num_samples=3"],
                                 capsys, monkeypatch)
    assert code == 0, err
    bulk = "myrun-0000020-ema-ddim2-cfg1.5-g3-seed0-n3"
    assert [f for f in _files_under(work) if bulk in f] == [f"outputs/samples/{bulk}.json",
                                                            f"outputs/samples/{bulk}.npz"]
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]


def test_eval_fid_writes_its_default_outputs_under_outputs(tmp_path, capsys, monkeypatch, random_inception):
    """eval_fid.py checkpoint=<run directory> (item 4) with no output paths: the samples, their
    metrics JSON and the results table all land under outputs/ of the working directory."""
    import numpy as np

    from dit.io.npz import write_npz_atomic

    inputs = tmp_path / "in"
    run = _run_dir(inputs)
    real = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ref = write_npz_atomic(inputs / "ref.npz", {"arr_0": real, "mu": np.zeros(2048), "sigma": 0.01 * np.eye(2048)})
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_program("eval_fid.py", [
        f"checkpoint={run}", f"reference={ref}", *FAST, "bulk.num_samples=4", "bulk.batch_size=4", "metrics=[fid]",
        f"feature_extractor_weights={random_inception}", "allow_download=false", f"cache_dir={inputs / 'cache'}"],
        capsys, monkeypatch)
    assert code == 0, err
    used = (run / "checkpoints" / "0000020.pt").resolve()
    assert f"sampling {used} (step 20)" in out
    stem = "outputs/samples/myrun-0000020-ema-ddim2-cfg1.5-g3-seed0-n4"
    assert _files_under(work) == ["outputs/results/eval_results.csv", f"{stem}.inception.metrics.json",
                                  f"{stem}.json", f"{stem}.npz"]
    record = json.loads((work / f"{stem}.inception.metrics.json").read_text())
    assert record["sampling"]["checkpoint"] == str(used) and record["metrics"]["num_samples"] == 4
    assert str(used) in (work / "outputs/results/eval_results.csv").read_text()
