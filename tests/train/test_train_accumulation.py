"""Gradient accumulation and fp16 loss scaling (issue 13): K micro-batches give the update of one
batch of the same global size, on 1 process and on 2 gloo ranks; DDP synchronises gradients once
per step; the gradient scaler halves its scale on an overflow and grows it after its interval,
without the non-finite guard counting its skips; kill -9 and resume stays bitwise with
accumulation, fp16 and a schedule on. Tiny models, CPU."""

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from dit.config import DebugConfig
from dit.diffusion import create_diffusion
from dit.distributed import DistEnv
from dit.train import EMA, run_training, train_step
from dit.train.faults import FaultInjector, NonFiniteGuard
from dit.train.randomness import RandomnessSpec, step_randomness
from dit.train.resume import checkpoint_path, list_checkpoints
from dit.train.step import LossScaler, StepInputs, StepSetup

from conftest import (TINY_DIT, TINY_RUN, assert_same_parameters, run_script, tiny_dit, torchrun_train, train_config,
                      train_single_process)

# 3 steps of a 2-block DiT on the 40-image toy set in pixel space, global batch 8.
ARGS = [*TINY_RUN, "data.num_workers=0", "name=a"]

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """The reference: one process, one backward pass over the global batch of 8 per step."""
    out = tmp_path_factory.mktemp("one_batch")
    return train_single_process(ARGS, out), metrics(out)


def test_four_micro_batches_of_two_give_the_update_of_one_batch_of_eight(tmp_path, one_batch):
    reference, reference_log = one_batch
    result = run_training(train_config([*ARGS, "optim.grad_accum_steps=4"]), tmp_path)
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert_same_parameters(reference, ckpt)
    assert ckpt["data_state"] == reference["data_state"]  # the same samples, in the same order
    for a, b in zip(reference_log, metrics(tmp_path)):  # the loss is the whole batch's mean
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    # Not the same computation (K was not ignored): the sums ran in another order.
    assert any(not torch.equal(v, reference["model"][k]) for k, v in ckpt["model"].items())


@pytest.mark.slow
def test_two_gloo_ranks_with_two_micro_batches_each_match_one_batch_of_eight(tmp_path, one_batch):
    torchrun_train([*ARGS, "optim.grad_accum_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert len(ckpt["rng"]["ranks"]) == 2 and ckpt["config"]["optim"]["grad_accum_steps"] == 2
    assert_same_parameters(one_batch[0], ckpt)


# --------------------------------------------------------------------------------------
# The step itself
# --------------------------------------------------------------------------------------

DIFFUSION = create_diffusion("")


def step_parts(model, batch=8, seed=0):
    """An optimizer, an EMA, a batch of latents with labels, and the randomness of step `seed`."""
    c = TINY_DIT
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c["in_channels"], c["input_size"], c["input_size"], generator=g)
    y = torch.randint(0, c["num_classes"], (batch,), generator=g)
    r = step_randomness(RandomnessSpec(0, batch, tuple(x.shape[1:]), DIFFUSION.num_timesteps, 0.1), seed, 0, 1,
                        torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    return opt, EMA(model, 0.9), x, y, r


def test_ddp_all_reduces_the_gradients_once_per_step_not_once_per_micro_batch(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_dit().train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        opt, ema, x, y, r = step_parts(model)
        params = [p for p in model.parameters() if p.requires_grad]
        train_step(StepSetup(ddp, DIFFUSION, opt, ema, num_classes=TINY_DIT["num_classes"], params=params),
                   StepInputs(x, y, r))
        per_step = len(calls)
        assert per_step >= 1
        train_step(StepSetup(ddp, DIFFUSION, opt, ema, num_classes=TINY_DIT["num_classes"], params=params,
                             accum_steps=4), StepInputs(x, y, r))
        assert len(calls) == 2 * per_step  # the same buckets, once: the first three backward passes kept theirs
    finally:
        dist.destroy_process_group()


def test_micro_batches_that_do_not_divide_the_batch_are_refused():
    model = tiny_dit().train()
    opt, ema, x, y, r = step_parts(model, batch=6)
    with pytest.raises(ValueError, match="6 rows do not split into 4 equal micro-batches"):
        train_step(StepSetup(model, DIFFUSION, opt, ema, num_classes=5, params=list(model.parameters()),
                             accum_steps=4),
                   StepInputs(x, y, r))


def fp16_step(model, scaler, guard, hooks=None, step=1):
    opt, ema, x, y, r = step_parts(model, seed=step)
    kwargs = {} if hooks is None else {"hooks": hooks}
    setup = StepSetup(model, DIFFUSION, opt, ema, num_classes=5, params=list(model.parameters()),
                      autocast_dtype=torch.float16, scaler=scaler, update_if=guard.update_if, **kwargs)
    return train_step(setup, StepInputs(x, y, r, step=step)), opt, ema


def test_an_fp16_overflow_halves_the_scale_and_skips_the_update_without_counting_as_a_failure():
    model = tiny_dit().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = LossScaler("cpu", init_scale=2.0 ** 40, growth_interval=2)  # 2^40 x the loss: inf in float16
    guard = NonFiniteGuard(1, DistEnv(0, 0, 1, torch.device("cpu")), watch_signals=False)  # 1 bad step stops
    (loss, grad_norm), opt, ema = fp16_step(model, scaler, guard)
    assert torch.isfinite(loss) and not torch.isfinite(grad_norm)
    assert scaler.skipped and scaler.skipped_steps == 1 and scaler.scale == 2.0 ** 39
    guard.record(1, loss, grad_norm, None)  # would raise NonFiniteTrainingError if it counted
    assert guard.counts == {"total": 0, "consecutive": 0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update ...
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())  # ... nor EMA
    assert all(int(s["step"]) == 0 for s in opt.state.values())  # AdamW did not count the step


def test_the_fp16_scale_grows_after_its_interval_of_clean_steps_and_is_saved_and_restored():
    model = tiny_dit().train()
    scaler = LossScaler("cpu", init_scale=1024.0, growth_interval=2)
    guard = NonFiniteGuard(1, DistEnv(0, 0, 1, torch.device("cpu")), watch_signals=False)
    scales = []
    for step in (1, 2, 3):
        before = model.final_layer.linear.weight.detach().clone()
        (loss, grad_norm), _, _ = fp16_step(model, scaler, guard, step=step)
        assert torch.isfinite(grad_norm) and not scaler.skipped
        assert not torch.equal(before, model.final_layer.linear.weight)  # updated
        scales.append(scaler.scale)
    assert scales == [1024.0, 2048.0, 2048.0]  # doubled after 2 clean steps
    state = scaler.state_dict()
    assert state["scale"] == 2048.0 and state["_growth_tracker"] == 1 and state["skipped_steps"] == 0
    restored = LossScaler("cpu")
    restored.load_state_dict(state)
    assert restored.scale == 2048.0 and restored.scaler.state_dict() == scaler.scaler.state_dict()


def test_a_nan_loss_or_an_overflow_at_scale_one_is_a_non_finite_step_under_fp16():
    """The scaler skips by design only a finite loss whose scaled gradient overflowed; a NaN
    loss, or an inf gradient at scale <= 1 (it overflows unscaled), is the guard's to count."""
    env = DistEnv(0, 0, 1, torch.device("cpu"))
    for debug, init_scale in ((DebugConfig(nan_loss_at_steps=[1]), 1024.0), (DebugConfig(nan_grad_at_steps=[1]), 1.0)):
        model = tiny_dit().train()
        scaler = LossScaler("cpu", init_scale=init_scale)
        guard = NonFiniteGuard(2, env, watch_signals=False)
        (loss, grad_norm), _, _ = fp16_step(model, scaler, guard, hooks=FaultInjector(debug, 0))
        guard.record(1, loss, grad_norm, None)
        assert not scaler.skipped and scaler.skipped_steps == 0
        assert guard.counts == {"total": 1, "consecutive": 1}, debug


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_and_resume_stay_bitwise_with_accumulation_fp16_and_a_schedule(tmp_path):
    """8 steps; checkpoint at 3 and 6; killed between the backward passes and the update of step 5.
    The loss scale grows 1e6 -> 2e6 -> 4e6 -> 8e6 (every 2 clean steps) and overflows at step 7:
    only a restored scale and growth tracker put that skip at the same step."""
    args = [*ARGS, "max_steps=8", "ckpt.every=3", "optim.grad_accum_steps=2", "precision=fp16",
            "optim.loss_scale_init=1e6", "optim.loss_scale_growth_interval=2", "optim.warmup_steps=2",
            "optim.schedule=cosine", "optim.lr=1e-3", "optim.min_lr=1e-5", "name=k"]
    reference = run_training(train_config(args), tmp_path / "reference")
    ref_log = metrics(tmp_path / "reference")
    assert ref_log[-1]["train/scaler_skipped_steps"] >= 1 and reference["skipped_steps"] == 0

    def train_py(*extra):
        return run_script("train.py", [*args, f"hydra.run.dir={tmp_path / 'crashed'}", *extra], cwd=tmp_path,
                          env={"OMP_NUM_THREADS": "1"})

    killed = train_py("debug.kill_at_step=5", "debug.kill_when=mid_step")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "crashed" / "checkpoints")] == [3]
    relaunched = train_py()
    assert relaunched.returncode == 0 and "(step 3)" in relaunched.stdout, relaunched.stderr[-3000:]
    a = torch.load(reference["checkpoint"], weights_only=True)
    b = torch.load(checkpoint_path(tmp_path / "crashed" / "checkpoints", 8), weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for key, state in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][key][name]) for name, v in state.items())
    assert a["scaler"] == b["scaler"]

    def untimed(lines):  # as text: a window of only skipped steps logs NaN, which is != NaN
        return [json.dumps({k: v for k, v in m.items() if not k.endswith("_per_sec")}) for m in lines]

    assert untimed(metrics(tmp_path / "crashed")) == untimed(ref_log)  # the lr and scale of every step too
