"""Training: EMA, per-step randomness, checkpoints and exact resume after kill -9, learning on
images and on cached latents (wandb offline), and hydra sweeps. Tiny models, CPU."""

import glob
import json
import signal
import struct
from pathlib import Path

import pytest
import torch
from dit.config import ConfigError
from dit.train import EMA, run_training
from dit.train.randomness import RandomnessSpec, step_randomness
from dit.train.resume import checkpoint_path, list_checkpoints, prune_checkpoints
from dit.train.stream import ItemSeeded

from conftest import TINY_MODEL, run_script, train_config, with_overrides

# A 2-block DiT on 16x16 pixels (patch 4: 16 tokens); runs a step in milliseconds.
TINY = [*TINY_MODEL, "data.image_size=16", "data.num_workers=0", "log.samples.every=0"]
TOY = ["data=toy", "data.num_per_class=4"]  # 40 images


make_config = train_config


def run_train_py(args, cwd, check=True):
    """`python train.py ...` as a user runs it (one thread, as in the in-process runs)."""
    proc = run_script("train.py", args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# One intra-op thread, as the subprocesses (OMP_NUM_THREADS=1): bitwise comparisons need the same.
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------


def test_ema_update_is_the_exponential_moving_average():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ema = EMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    assert list(ema.module.state_dict()) == list(model.state_dict())  # same keys: official layout for a DiT


def test_step_randomness_does_not_depend_on_the_number_of_ranks():
    spec = RandomnessSpec(seed=3, global_batch=8, shape=(3, 4, 4), num_timesteps=1000, drop_prob=0.5, posterior=True)
    kw = dict(step=7, device=torch.device("cpu"))
    whole = step_randomness(spec, rank=0, world_size=1, **kw)
    parts = [step_randomness(spec, rank=r, world_size=2, **kw) for r in range(2)]
    for name in ("t", "noise", "drop", "posterior"):
        merged = torch.empty_like(getattr(whole, name))
        merged[0::2], merged[1::2] = getattr(parts[0], name), getattr(parts[1], name)  # rank r: rows r, r + W, ...
        assert torch.equal(merged, getattr(whole, name)), name
    assert 0 < whole.drop.sum() < 8 and whole.t.max() < 1000
    other = step_randomness(spec, rank=0, world_size=1, **{**kw, "step": 8})
    assert not torch.equal(other.noise, whole.noise) and not torch.equal(other.t, whole.t)


def test_item_seeded_augmentation_depends_only_on_seed_epoch_and_index():
    from dit.data.toy import ToyShapesDataset

    ds = ItemSeeded(ToyShapesDataset(2, image_size=16, seed=0, hflip=True), seed=5)
    first = [ds[i][0] for i in range(len(ds))]
    torch.manual_seed(123)  # the caller's RNG state does not matter ...
    state = torch.get_rng_state()
    backwards = [ds[i][0] for i in reversed(range(len(ds)))][::-1]  # ... nor the order of access
    assert torch.equal(torch.get_rng_state(), state)  # and it is left untouched
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    plain = ToyShapesDataset(2, image_size=16, seed=0, hflip=False)
    flipped = [not torch.equal(x, plain[i][0]) for i, x in enumerate(first)]
    assert 0 < sum(flipped) < len(flipped)  # some items mirrored, some not
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], first[i]) for i in range(len(ds)))  # a new epoch, new flips


def test_prune_keeps_the_newest_and_the_milestones(tmp_path):
    for step in (2, 4, 6, 8, 10):
        checkpoint_path(tmp_path, step).write_bytes(b"x")
    (tmp_path / ".0000012.pt.123.tmp").write_bytes(b"partial")  # an interrupted write is not a checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6, 8, 10]
    prune_checkpoints(tmp_path, keep_last=2, keep_every=4)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 10]
    prune_checkpoints(tmp_path, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 3


def test_checkpoint_follows_the_contract_and_loads_as_a_dit(tmp_path):
    from dit.io.checkpoint import load_dit_checkpoint

    cfg = make_config([*TINY, *TOY, "name=c", "global_batch_size=8", "max_steps=3", "ckpt.every=2",
                       "ckpt.keep_last=1", "log.every=1"])
    result = run_training(cfg, tmp_path)
    assert result["step"] == 3 and [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert {"model", "ema", "opt", "step", "model_name", "model_config", "autoencoder", "config", "rng",
            "data_state", "wandb_run_id", "format_version"} <= set(ckpt)
    assert ckpt["step"] == 3 and ckpt["format_version"] == 1 and ckpt["model_name"] is None  # depth 2: custom
    assert ckpt["model_config"]["num_classes"] == 10 and ckpt["model_config"]["input_size"] == 16
    assert ckpt["autoencoder"]["name"] == "pixel" and ckpt["config"]["optim"]["lr"] == 1e-4
    assert ckpt["config"]["precision"] == "fp32"  # plain values, not enums
    assert ckpt["data_state"] == {"epoch": 0, "position": 24, "steps_per_epoch": 5, "dataset_size": 40}
    assert "blocks.1.adaLN_modulation.1.weight" in ckpt["ema"] and ckpt["model"].keys() == ckpt["ema"].keys()
    assert ckpt["ema"]["y_embedder.embedding_table.weight"].shape[0] == 11  # 10 classes + the null class
    model, meta = load_dit_checkpoint(result["checkpoint"], which="ema")
    assert model.config.depth == 2 and model.config.class_dropout_prob == 0.1
    assert torch.equal(model.state_dict()["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]


def test_a_changed_recipe_is_refused_in_the_same_run_directory(tmp_path):
    base = [*TINY, *TOY, "name=r", "global_batch_size=8", "max_steps=1", "log.every=1"]
    run_training(make_config(base), tmp_path)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.0001 -> 0.0002"):
        run_training(make_config([*base, "optim.lr=2e-4", "max_steps=2"]), tmp_path)
    # Longer, or reporting differently, is the same run: it continues.
    assert run_training(make_config([*base, "max_steps=2", "log.every=2"]), tmp_path)["step"] == 2
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_time_based_checkpoints_bound_the_work_a_preemption_loses(tmp_path):
    cfg = make_config([*TINY, *TOY, "name=t", "global_batch_size=8", "max_steps=5", "log.every=2",
                       "ckpt.every=1000", "ckpt.every_minutes=1e-6", "ckpt.keep_last=null"])
    run_training(cfg, tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 5]  # at log steps, and the end


def test_memory_and_precision_options_keep_the_math(tmp_path):
    base = [*TINY, *TOY, "global_batch_size=8", "max_steps=2", "log.every=1"]

    def run(name, *extra):
        result = run_training(make_config([*base, f"name={name}", *extra]), tmp_path / name)
        return torch.load(result["checkpoint"], weights_only=True), metrics(tmp_path / name)

    (plain, plain_log), (ckpt, _) = run("plain"), run("checkpointed", "grad_checkpointing=true")
    assert all(torch.equal(plain["model"][k], v) for k, v in ckpt["model"].items())  # recomputation is exact
    bf16, bf16_log = run("bf16", "precision=bf16")
    # Step 1 sees the zero output of adaLN-Zero in any precision; step 2 does not.
    assert bf16_log[1]["train/loss"] == pytest.approx(plain_log[1]["train/loss"], rel=2e-2)
    assert bf16_log[1]["train/loss"] != plain_log[1]["train/loss"]  # autocast did run in bfloat16
    workers, _ = run("workers", "data.num_workers=2")  # augmentation is seeded per item, not per worker
    assert all(torch.equal(plain["ema"][k], v) for k, v in workers["ema"].items())


# --------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------

LEARN = ["model.hidden_size=64", "global_batch_size=16", "max_steps=60", "log.every=15", "optim.lr=1e-3",
         "ckpt.every=1000"]


def _falls(losses):
    return losses[-1] < 0.5 * losses[0] and losses[0] > 0.5


@pytest.mark.slow
def test_loss_falls_in_pixel_space_on_an_imagefolder(tmp_path):
    from dit.data.toy import write_toy_imagefolder

    root = write_toy_imagefolder(tmp_path / "images", num_per_class=8, image_size=16, seed=0)
    cfg = make_config([*TINY, *LEARN, "data=imagefolder", f"data.root={root}", "name=px"])
    run_training(cfg, tmp_path / "run")
    losses = [m["train/loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 4 and _falls(losses), losses


def wandb_history(run_dir):
    """History rows of an offline wandb run, read from its `.wandb` file (a LevelDB-style log of
    protobuf `Record`s in 32 KiB blocks, after a 7-byte header)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    # wandb's service process writes the file behind the run: `finish()` can return before it is
    # flushed on a loaded machine. Shutting the service down waits for every write.
    wandb.teardown()
    (path,) = glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, block, records, partial = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += (block - pos % block) % block
        elif kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    rows, kinds = [], []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kinds.append(record.WhichOneof("record_type"))
        if kinds[-1] == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    assert "exit" in kinds, f"{path} is incomplete (no exit record; records: {kinds})"
    return rows


@pytest.mark.slow
def test_loss_falls_on_cached_latents_and_wandb_offline_records_loss_and_grids(tmp_path, tiny_vae_dir):
    from dit.autoencoder import build_autoencoder
    from dit.data import CacheFormat, CacheRun, build_latent_cache
    from dit.data.toy import write_toy_imagefolder

    vae = tiny_vae_dir
    images = write_toy_imagefolder(tmp_path / "images", num_per_class=8, image_size=16, seed=0)
    cache = build_latent_cache(images, build_autoencoder(str(vae)), tmp_path / "cache", 16,
                               fmt=CacheFormat(dtype="float32"),
                               run=CacheRun(batch_size=40, num_workers=0, progress=False))
    cfg = make_config([*TINY, *LEARN, "model=DiT-S/2", "data=latents", f"data.root={cache}", "vae=local",
                       f"vae.name={vae}", "log.wandb.mode=offline", "log.samples.every=30",
                       "log.samples.num_images=4", "log.samples.num_steps=4", "name=lat"])
    run_training(cfg, tmp_path / "run")
    losses = [m["train/loss"] for m in metrics(tmp_path / "run")]
    assert _falls(losses), losses

    rows = wandb_history(tmp_path / "run")
    logged = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in logged] == [15, 30, 45, 60]
    assert [l for _, l in logged] == pytest.approx(losses)
    grids = [r for r in rows if "samples/_type" in r]
    assert [r["_step"] for r in grids] == [30, 60] and all(r["samples/format"] == "png" for r in grids)
    png = next(Path(tmp_path / "run" / "wandb").glob("offline-run-*/files/" + grids[0]["samples/path"]))
    from PIL import Image

    grid = Image.open(png)
    assert grid.mode == "RGB" and grid.size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))  # 2x2 decoded 16x16 images
    assert (tmp_path / "run" / "samples" / "0000060.png").is_file()
    # The run id is kept in the checkpoint: a resumed run logs to the same wandb run.
    run_id = torch.load(tmp_path / "run" / "checkpoints" / "0000060.pt", weights_only=True)["wandb_run_id"]
    assert png.parents[3].name.endswith("-" + run_id)


# --------------------------------------------------------------------------------------
# Crash and resume
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_then_relaunch_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    # 12 steps over 2.4 epochs of the 40-image toy set; checkpoints every 4 steps.
    args = [*TINY, *TOY, "global_batch_size=8", "max_steps=12", "ckpt.every=4", "log.every=1", "name=k"]
    reference = run_training(make_config(args), tmp_path / "reference")
    run_dir = f"hydra.run.dir={tmp_path / 'crashed'}"

    killed = run_train_py([*args, run_dir, "debug.kill_at_step=6"], tmp_path, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(tmp_path / "crashed" / "checkpoints")] == [4]  # steps 5, 6 lost

    relaunched = run_train_py([*args, run_dir], tmp_path)  # the same command again
    assert "resuming from" in relaunched.stdout and "(step 4)" in relaunched.stdout
    a = torch.load(reference["checkpoint"], weights_only=True)
    b = torch.load(checkpoint_path(tmp_path / "crashed" / "checkpoints", 12), weights_only=True)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for key, state in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][key][name]) for name, v in state.items())
    assert [m["step"] for m in metrics(tmp_path / "crashed")] == list(range(1, 13))  # no duplicates of 5, 6


# --------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_multirun_sweep_gives_one_flat_run_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    one_block = with_overrides(TINY_MODEL, "model.depth=1")
    run_train_py(["-m", *with_overrides(one_block, "model=DiT-S/4,DiT-B/8"), *TOY, "data.image_size=16",
                  "global_batch_size=4", "max_steps=2", "log.every=1", "log.samples.every=0",
                  f"hydra.sweep.dir={sweep}"], tmp_path)
    # Job directories are named by the job's overrides (issue 13: a relaunch finds them again).
    from dit.config import job_dirname

    common = [*TOY, "data.image_size=16", "global_batch_size=4"]
    expected = {model: job_dirname([*with_overrides(one_block, f"model={model}"), *common])
                for model in ("DiT-S-4", "DiT-B-8")}
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == sorted(expected.values())
    for model, patch in (("DiT-S-4", 4), ("DiT-B-8", 8)):
        name = expected[model]
        ckpt = torch.load(sweep / name / "checkpoints" / "0000002.pt", weights_only=True)
        assert ckpt["model_config"]["patch_size"] == patch and ckpt["config"]["name"] == f"{model}_toy/{name}"
        assert (sweep / name / ".hydra" / "config.yaml").is_file()
