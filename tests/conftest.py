"""Shared pytest setup: the `slow` marker, a fixed seed (and autograd on) per test, and what
several test files need: one tiny DiT, one tiny saved VAE, one hydra composer (and the training
config it gives), the entry programs run in this process (and the one-line error they end in),
one single-thread switch, random Inception weights, the toy judge's report, and the tiny training
runs: one process against ranks, and the toy run in forked processes that the reliability,
fine-tuning, REPA and flow training tests kill, signal and resume.

The tests are in folders that mirror dit/ (models/, objectives/, data/, train/, sampling/,
scoring/, io/, reliability/, cli/); this file, in tests/, serves them all.

Plain functions (`tiny_dit`, `train_config`, `compose_config`, `single_thread`, ...) serve
module-scoped fixtures and helpers (`from conftest import ...`); the fixtures of the same names
serve tests.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.train import run_training

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU (still runs in CI)")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test starts from the same global RNG state, and with autograd on, whatever ran before
    it (sample.py's `run()`, called in this process by `run_program`, turns autograd off)."""
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    yield


# ------------------------------------------------------------------------------ configs


def compose_config(config_name: str, overrides=(), return_hydra_config: bool = False):
    """The DictConfig hydra composes from conf/ for `config_name` ("train", "sample", "eval"),
    with the schemas registered and the command-line rewrites applied, as the entry points see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dit.config import flatten_model_overrides, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=flatten_model_overrides(list(overrides)),
                             return_hydra_config=return_hydra_config)


def train_config(overrides=()):
    """The `TrainConfig` that `python train.py <overrides>` would run with."""
    from dit.config import to_train_config

    return to_train_config(compose_config("train", overrides))


@pytest.fixture
def compose():
    """compose(config_name, overrides) -> the composed DictConfig (see `compose_config`)."""
    return compose_config


# ------------------------------------------------------------------------------ entry programs


def _programs() -> dict:
    from dit.cli import cache_latents, eval_fid, sample, train

    return {"train.py": train.run, "sample.py": sample.run, "eval_fid.py": eval_fid.run,
            "cache_latents": cache_latents.run}


def run_program(program: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`program args...` (train.py, sample.py, eval_fid.py, cache_latents) in this process through
    the `run()` its console script calls: hydra's composition and the one-line error handling
    exactly as on the command line, without a subprocess's start-up. Returns (exit status,
    stdout, stderr); logging is put back as it was (hydra configures it for its job)."""
    import logging

    monkeypatch.setattr(sys, "argv", [program, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        _programs()[program]()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        root.handlers[:], root.level = handlers, level
    out, err = capsys.readouterr()
    return code, out, err


def script_command(script: str, args=(), ranks: int = 1) -> list[str]:
    """The command line of an entry program in a new process: `script` a file of the repository
    (train.py, sample.py, eval_fid.py) or a module (dit.cache_latents: `python -m`), with `args`;
    with `ranks` > 1 under torchrun (`python -m torch.distributed.run --standalone
    --nproc_per_node=<ranks>`)."""
    program = [str(REPO / script)] if script.endswith(".py") else ["-m", script]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    return [sys.executable, *launcher, *program, *args]


def _environment(env: dict | None) -> dict | None:
    return None if env is None else {**os.environ, **env}


def run_script(script: str, args=(), *, cwd, env: dict | None = None, ranks: int = 1,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`script args...` (see `script_command`) run to the end in `cwd`, this process's environment
    with `env`'s variables set, its output captured as text; fails after `timeout` seconds."""
    return subprocess.run(script_command(script, args, ranks), cwd=cwd, env=_environment(env), capture_output=True,
                          text=True, timeout=timeout)


def start_script(script: str, args=(), *, cwd, env: dict | None = None, ranks: int = 1) -> subprocess.Popen:
    """`script args...` (see `script_command`) started in `cwd`, this process's environment with
    `env`'s variables set: a process to signal or kill, stdout and stderr in one text pipe."""
    return subprocess.Popen(script_command(script, args, ranks), cwd=cwd, env=_environment(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_one_line(code: int, err: str, *names: str) -> None:
    """A known failure of an entry program: exit status 1 and one `error: ...` line on stderr
    naming each of `names` (dit/cli/errors.py), no traceback."""
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])


# ------------------------------------------------------------------------------ sampling


def bulk_sample_with(model, objective, autoencoder, out, settings, *, num_samples: int, seed: int, batch_size: int,
                     label_mode: str = "uniform", rank: int = 0, world_size: int = 1, barrier=None,
                     **options):
    """`dit.sampling.bulk.bulk_sample` from settings and an objective (None: the release chain
    with the model's learned sigma), as sample.py builds its arguments: the sampler built once
    for the autoencoder, the job and the ranks. `options`: provenance, keep_shards, progress,
    on_shard_written."""
    from dit.sampling.bulk import BulkJob, Ranks, bulk_sample
    from dit.sampling.samplers import build_sampler
    from dit.sampling.trained import diffusion_from_config

    if objective is None:
        objective = diffusion_from_config(None, getattr(model, "module", model).config.learn_sigma)
    job = BulkJob(num_samples=num_samples, seed=seed, batch_size=batch_size, label_mode=label_mode,
                  keep_shards=options.pop("keep_shards", False))
    sampler = build_sampler(settings, objective, autoencoder)
    return bulk_sample(model, sampler, autoencoder, out, job, ranks=Ranks(rank, world_size, barrier), **options)


# ------------------------------------------------------------------------------ faults


class FullDisk:
    """Wraps an open file: it takes `room` bytes, then fails every write as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# ------------------------------------------------------------------------------ threads


@contextmanager
def single_thread():
    """One intra-op thread inside the block: bitwise comparisons with runs in subprocesses
    (OMP_NUM_THREADS=1) need the same thread count, and tiny models run faster without threads
    competing for shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """The test runs with one intra-op thread (`single_thread`)."""
    with single_thread():
        yield


# ------------------------------------------------------------------------------ models

# The tiny DiT of the tests: a 4x4 token grid, two blocks of width 32, five classes.
TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def tiny_dit(seed: int | None = 0, noise: float = 0.05, **config):
    """A tiny `DiT` (TINY_DIT with `config`'s fields changed), in eval mode, with noise of std
    `noise` added to every trained weight: adaLN-Zero starts the modulation and output layers at
    zero, which would make the output independent of labels, timesteps and most weights.
    `seed` fixes the weights; None draws them from the current global RNG."""
    from dit.models import DiT

    if seed is not None:
        torch.manual_seed(seed)
    model = DiT(**(TINY_DIT | config))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------ files


def write_tiny_vae(path: str | os.PathLike) -> Path:
    """A random two-level AutoencoderKL (downsampling 2, 4 latent channels) written with
    save_pretrained: what `vae=DIR` loads."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=16,
        )
    vae.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae"))


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised InceptionV3 state dict in torch-fidelity's layout, for offline tests and
    timing only (its features mean nothing). Kaiming-normal convolutions keep activations O(1)
    through the 90-odd layers, so the statistics are well scaled."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from dit.io.checkpoint import save_atomic

    class _RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    placeholder = path.with_name(f".{path.name}.empty")
    torch.save({}, placeholder)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _RandomInception("random-inception", ["2048"], feature_extractor_weights_path=str(placeholder))
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.normal_(net.fc.weight, std=2048 ** -0.5)
    finally:
        placeholder.unlink()
    return save_atomic(net.state_dict(), path)


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 architecture with random weights, saved to a file: the real
    code path, no network."""
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


# ------------------------------------------------------------------------------ the toy judge


def judge_report(samples_uint8, labels, real_uint8, judge) -> dict:
    """Score generated toy samples against real ones with the toy judge.

    samples_uint8: (N, H, W, 3) generated images; labels: (N,) the classes they were
    conditioned on; real_uint8: (M, H, W, 3) real toy images.
    Returns {"class_accuracy", "per_class_accuracy", "frechet_distance", "num_samples", "num_real"}.
    """
    from dit.scoring.metrics import feature_statistics, frechet_distance
    from dit.data.toy import NUM_CLASSES

    samples = samples_uint8.numpy() if isinstance(samples_uint8, torch.Tensor) else np.asarray(samples_uint8)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if labels.shape != (len(samples),):
        raise ValueError(f"need one label per sample: {len(samples)} samples, labels shaped {labels.shape}")
    correct = judge.classify(samples) == labels
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(NUM_CLASSES)]
    mu_g, sigma_g = feature_statistics(judge.features(samples))
    mu_r, sigma_r = feature_statistics(judge.features(real_uint8))
    return {
        "class_accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(mu_g, sigma_g, mu_r, sigma_r),
        "num_samples": int(len(samples)),
        "num_real": int(len(real_uint8)),
    }


@pytest.fixture(name="judge_report")
def judge_report_fixture():
    """`judge_report(samples, labels, real, judge)`: class accuracy and judge Fréchet distance."""
    return judge_report


# ------------------------------------------------------------------------------ tiny runs

# The model of every tiny training run: DiT-S/4 cut to 2 blocks of width 32 (2 heads), in pixel
# space. Each run adds its data, batch and step keys (`with_overrides` changes a key of it).
TINY_MODEL = ["model=DiT-S/4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "vae=pixel"]


def with_overrides(base: list[str], *overrides: str) -> list[str]:
    """`base` with each override in the place of the one of the same key (`model=...`,
    `model.depth=...`), or appended where `base` has none: hydra refuses a group chosen twice."""
    def key(arg: str) -> str:
        return arg.partition("=")[0].lstrip("+~")

    new = {key(o): o for o in overrides}
    return [new.pop(key(o), o) for o in base] + list(new.values())


# ------------------------------------------------------------------------------ tiny runs: one process vs ranks

# 3 steps of a 2-block DiT on the 40-image toy set in pixel space, global batch 8: the run that
# tests/train/test_distributed.py and tests/train/test_train_accumulation.py train on one process
# and under torchrun and compare parameter by parameter. Add name=... (and any other key) per test
# file.
TINY_RUN = [*TINY_MODEL, "data=toy", "data.num_per_class=4", "data.image_size=16", "global_batch_size=8",
            "max_steps=3", "log.every=1", "log.samples.every=0"]


def train_single_process(args, out: str | os.PathLike) -> dict:
    """The reference of the rank comparisons: `args` trained in this process on one thread, into
    `out`; returns its final checkpoint (weights only)."""
    with single_thread():
        result = run_training(train_config(args), out)
    return torch.load(result["checkpoint"], weights_only=True)


def torchrun_train(args, cwd) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 train.py <args>` on CPU (gloo, one thread per
    rank) in `cwd`; asserts that it succeeded and returns the finished process."""
    proc = run_script("train.py", args, cwd=cwd, env={"OMP_NUM_THREADS": "1"}, ranks=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# 1 rank vs 2, or one batch vs micro-batches, sum the same gradients in another order: float32
# rounding (1.2e-7 relative per sum) then passes through 3 AdamW steps, whose update lr * m /
# (sqrt(v) + eps) amplifies it for gradients near eps. The largest relative difference measured
# was 1.04e-6 (the zero-initialised output layer, whose norm after 3 steps is a few updates; on
# an AMD EPYC, AVX2); 1e-5 bounds it 10x, while a real fault (a micro-batch or a rank's gradient
# lost, K ignored) moves these tensors by more than 1e-2 of their norm.
SAME_PARAMETERS_RTOL = 1e-5


def assert_same_parameters(reference: dict, ckpt: dict, rtol: float = SAME_PARAMETERS_RTOL) -> None:
    """Every model and EMA tensor of `ckpt` within `rtol` (relative norm) of `reference`'s, and
    the reference trained: its zero-initialised output layer moved."""
    for part in ("model", "ema"):
        assert reference[part].keys() == ckpt[part].keys()
        for key, ref in reference[part].items():
            rel = (ckpt[part][key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert rel <= rtol, f"{part}.{key}: relative difference {rel:.2e}"
    assert reference["model"]["final_layer.linear.weight"].abs().max() > 0  # it trained


def threads_as_ranks(world_size, fn):
    """Run fn(rank, world_size, barrier) for every rank at once in threads (a gloo-free stand-in
    for torchrun: real concurrency, a real barrier)."""
    barrier = threading.Barrier(world_size, timeout=120)
    errors = []

    def run(rank):
        try:
            fn(rank, world_size, barrier.wait)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def torchrun_bulk_sample(overrides: list[str], out: Path) -> Path:
    """`torchrun --standalone --nproc_per_node=2 sample.py <overrides> bulk.out=<out>` (gloo, CPU,
    one thread a rank); asserts it ran on 2 ranks and returns `out`."""
    proc = run_script("sample.py", [*overrides, f"bulk.out={out}"], cwd=out.parent,
                      env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    return out


# ------------------------------------------------------------------------------ the toy run in forked processes

# A 2-block DiT on 16x16 toy images (40) in pixel space, global batch 8 (5 steps per epoch): the
# run the reliability tests kill, signal and resume, and the fine-tuning, REPA and flow training
# tests start from. TOY_RUN_STEPS (~1 s of training) is long enough for a signal to land mid-run.
TOY_RUN_STEPS = 40
TOY = ["data=toy", "data.num_per_class=4"]
TOY_RUN = [*TOY, *TINY_MODEL, "data.image_size=16", "data.num_workers=0", "log.samples.every=0",
           "global_batch_size=8", "log.every=1", "ckpt.every_minutes=null", "name=r"]
FORK = multiprocessing.get_context("fork")


def toy_run_config(*overrides):
    """The tiny run of TOY_RUN with `overrides` (on the toy set unless they choose `data=`)."""
    base = TOY_RUN if not any(o.startswith("data=") for o in overrides) else [o for o in TOY_RUN if o not in TOY]
    return train_config([*base, *overrides])


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for key, state in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][key][name]) for name, v in state.items()), key


def final_state(run_dir: Path) -> dict:
    """The checkpoint of step TOY_RUN_STEPS in `run_dir`, loaded weights-only."""
    from dit.train.resume import checkpoint_path

    return torch.load(checkpoint_path(run_dir / "checkpoints", TOY_RUN_STEPS), weights_only=True)


def start_forked(fn, *args):
    """fn(*args) in a forked child process. Its exit code: 0, 1 (exception), -9 (SIGKILL), or the
    code of a SystemExit (TrainingPreempted: fault.preempt_exit_code)."""
    proc = FORK.Process(target=_one_thread_child, args=(fn, *args))
    proc.start()
    return proc


def _one_thread_child(fn, *args):
    # One intra-op thread in the child, as the references are computed (`single_thread`). It also
    # keeps the child out of the OpenMP thread team a multi-threaded op of the parent may have
    # started: libgomp's team does not survive fork, and the child's first parallel op would hang.
    torch.set_num_threads(1)
    fn(*args)


def start_training(cfg, run_dir, before=None):
    """`run_training(cfg, run_dir)` in a forked child (`before()` first, in the child)."""
    def target():
        if before is not None:
            before()
        run_training(cfg, run_dir)

    return start_forked(target)


def joined(proc, timeout=120.0) -> int:
    """Wait for a forked child (`timeout` seconds at most, else kill it and fail): its exit code."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError("the child did not finish in time")
    return proc.exitcode


def train_on_two_gloo_ranks(cfg, run_dir: Path, step: int) -> dict:
    """Train `cfg` on two forked gloo ranks (rank environment set as torchrun does) into
    `run_dir`; returns the checkpoint of `step`, loaded weights-only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def rank(r):
        os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        run_training(cfg, run_dir)

    ranks = [start_forked(rank, r) for r in range(2)]
    assert [joined(p) for p in ranks] == [0, 0]
    return torch.load(run_dir / "checkpoints" / f"{step:07d}.pt", weights_only=True)


# ------------------------------------------------------------------------------ shared fixtures


@pytest.fixture
def restore_logging():
    """hydra configures logging for its job (a handler on the captured stdout): put it back after
    each test, so that later tests do not log into a closed capture stream. Use it with
    `pytestmark = pytest.mark.usefixtures("restore_logging")` in files that run entry points."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails: what loads here loads offline."""
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_kill9_resumes_bitwise(config, common: list, tmp_path: Path) -> None:
    """Train `config(*common)` uninterrupted, then the same run killed with SIGKILL after a step
    (step 7) and in the middle of one (step 17) and relaunched each time: the final training
    state must equal the uninterrupted one bit for bit."""
    with single_thread():
        run_training_in_process(config(*common), tmp_path / "reference")
    reference = final_state(tmp_path / "reference")
    run = tmp_path / "run"
    for step, when in ((7, "after_step"), (17, "mid_step")):
        assert joined(start_training(config(*common, f"debug.kill_at_step={step}", f"debug.kill_when={when}"),
                                     run)) == -9
    assert joined(start_training(config(*common), run)) == 0
    assert_same_training_state(final_state(run), reference)


def run_training_in_process(cfg, run_dir):
    from dit.train import run_training

    return run_training(cfg, run_dir)
