"""Learning-rate warmup and schedules (issue 13): the lr of every step equals its formula and
torch's own schedulers, the default stays the paper's constant lr bit for bit, the metrics file
logs the lr of each step; the new optimizer keys are checked before any work, and only
`optim.grad_accum_steps` may change on resume."""

import copy
import json
from pathlib import Path

import pytest
import torch
from dit.config import ConfigError, OptimConfig, Parallel, Precision, check_static, config_mismatches
from dit.config.schema import Schedule
from dit.train import run_training
from dit.train.optimizer import learning_rate
from dit.train.resume import plain_config

from conftest import TINY_MODEL, train_config

TINY = [*TINY_MODEL, "data=toy", "data.num_per_class=4", "data.image_size=16", "data.num_workers=0",
        "global_batch_size=8", "log.every=1", "log.samples.every=0", "name=s"]

pytestmark = pytest.mark.usefixtures("one_thread")


def logged_lr(run_dir):
    return [json.loads(line)["train/lr"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_warmup_is_linear_from_zero_and_equals_its_formula_exactly():
    for schedule in Schedule:
        o = OptimConfig(lr=3e-4, warmup_steps=4, schedule=schedule, min_lr=1e-6)
        assert [learning_rate(n, o, 100) for n in range(1, 5)] == [3e-4 * n / 4 for n in range(1, 5)]
        assert learning_rate(4, o, 100) == 3e-4  # the warmup ends at the full lr
    assert [learning_rate(n, OptimConfig(lr=1.0, warmup_steps=4), 10) for n in range(1, 7)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_after_warmup_follows_torchs_schedulers_and_then_stays_at_min_lr(schedule):
    warmup, end, lr, min_lr = 3, 12, 1e-3, 1e-5
    o = OptimConfig(lr=lr, warmup_steps=warmup, schedule=Schedule(schedule), min_lr=min_lr, decay_steps=end)
    # Torch's schedulers, stepped once per optimizer step: the independent reference.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler
    decay = (sched.CosineAnnealingLR(opt, T_max=end - warmup, eta_min=min_lr) if schedule == "cosine"
             else sched.LinearLR(opt, 1.0, min_lr / lr, total_iters=end - warmup))
    warm = sched.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1)
    torch_lr = sched.SequentialLR(opt, [warm, decay], milestones=[warmup - 1])
    for n in range(1, end + 1):
        assert learning_rate(n, o, 1000) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), n
        opt.step()
        torch_lr.step()
    halfway = min_lr + (lr - min_lr) * 0.5  # both schedules pass the middle value halfway through the decay
    o_even = OptimConfig(lr=lr, warmup_steps=2, schedule=Schedule(schedule), min_lr=min_lr, decay_steps=12)
    assert learning_rate(7, o_even, 1000) == pytest.approx(halfway, rel=1e-12)
    assert [learning_rate(n, o, 1000) for n in (end, end + 1, 10 * end)] == [min_lr] * 3
    # decay_steps=None decays to max_steps.
    assert learning_rate(40, OptimConfig(lr=lr, schedule=Schedule(schedule)), 40) == 0.0


def test_the_default_lr_is_the_papers_constant_bit_for_bit_and_is_logged(tmp_path):
    o = OptimConfig()
    assert all(learning_rate(n, o, 400_000) == 1e-4 for n in (1, 2, 1000, 399_999, 400_000, 10**7))
    run_training(train_config([*TINY, "max_steps=3"]), tmp_path / "default")
    assert logged_lr(tmp_path / "default") == [1e-4, 1e-4, 1e-4]


def test_the_metrics_file_logs_each_steps_scheduled_lr(tmp_path):
    cfg = train_config([*TINY, "max_steps=5", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=linear",
                        "optim.min_lr=1e-4"])
    run_training(cfg, tmp_path)
    # n = 1, 2: 1e-3 * n / 2; then from 1e-3 down to 1e-4 over steps 2..5.
    expected = [5e-4, 1e-3, 1e-4 + 9e-4 * (2 / 3), 1e-4 + 9e-4 * (1 / 3), 1e-4]
    assert logged_lr(tmp_path) == pytest.approx(expected, rel=1e-12)
    assert logged_lr(tmp_path) == [learning_rate(n, cfg.optim, 5) for n in range(1, 6)]


@pytest.fixture(scope="module")
def base():
    return train_config(TINY)


def changed(cfg, **values):
    """A copy of `cfg` with dotted keys (written with `__`) set: changed(cfg, optim__lr=1.0)."""
    cfg = copy.deepcopy(cfg)
    for key, value in values.items():
        *parents, leaf = key.split("__")
        node = cfg
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, value)
    return cfg


@pytest.mark.parametrize("values, message", [
    (dict(optim__grad_accum_steps=0), "optim.grad_accum_steps must be >= 1"),
    (dict(optim__grad_accum_steps=3), r"global_batch_size=8 does not split into 1 rank\(s\) x optim.grad_accum_steps=3"),
    (dict(optim__warmup_steps=-1), "optim.warmup_steps must be >= 0"),
    (dict(optim__min_lr=1.0), r"optim.min_lr must be in \[0, optim.lr=0.0001\]"),
    (dict(optim__schedule=Schedule.cosine, optim__warmup_steps=10, max_steps=10),
     r"max_steps \(optim.decay_steps is null\)=10"),
    (dict(optim__schedule=Schedule.linear, optim__decay_steps=5, optim__warmup_steps=5), "optim.decay_steps=5"),
    (dict(precision=Precision.fp16, optim__loss_scale_init=0.0), "optim.loss_scale_init must be positive"),
])
def test_bad_accumulation_schedule_or_scaler_settings_are_refused_naming_the_key(base, values, message):
    check_static(base)
    with pytest.raises(ConfigError, match=message):
        check_static(changed(base, **values))


def test_accumulation_splits_per_rank_and_fp16_is_refused_under_fsdp(base):
    check_static(changed(base, optim__grad_accum_steps=2), world_size=2)  # 8 = 2 ranks x 2 micro-batches x 2
    with pytest.raises(ConfigError, match=r"into 4 rank\(s\) x optim.grad_accum_steps=4 .* multiple of 16"):
        check_static(changed(base, optim__grad_accum_steps=4, global_batch_size=12), world_size=4)
    fp16_fsdp = changed(base, precision=Precision.fp16, parallel=Parallel.fsdp)
    check_static(fp16_fsdp, world_size=1)  # one rank: nothing is sharded
    with pytest.raises(ConfigError, match="precision=fp16 .* not supported with parallel=fsdp: use precision=bf16"):
        check_static(fp16_fsdp, world_size=2)


def test_only_the_accumulation_steps_may_change_on_resume(base):
    saved = plain_config(base)
    for key, value, allowed in (("grad_accum_steps", 4, True), ("warmup_steps", 100, False),
                                ("schedule", Schedule.cosine, False), ("min_lr", 1e-6, False),
                                ("decay_steps", 10, False), ("loss_scale_init", 1024.0, False)):
        now = plain_config(changed(base, **{f"optim__{key}": value}))
        assert (config_mismatches(saved, now) == []) is allowed, key
    fp16 = plain_config(changed(base, precision=Precision.fp16))
    assert config_mismatches(saved, fp16) == ["precision: 'fp32' -> 'fp16'"]
