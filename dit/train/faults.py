"""What a run does when something goes wrong (docs/reliability.md): preemption signals, steps
whose loss or gradient is not finite, and the fault injection that the crash tests use.

Fault injection (`debug.*`) is one object handed to the step and the trainer, called at named
points (`loss`, `gradients`, `before_update`, `after_update`, `after_step`, `checkpoint_write`); the default
`Faults()` does nothing there, so the hot path holds no `if cfg.debug...`.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from dit.distributed import DistEnv, all_reduce_sum
from dit.preemption import take_over
from dit.io.atomic import write_atomic

log = logging.getLogger(__name__)


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped because its loss or gradients stayed non-finite (NaN/inf)."""


class TrainingPreempted(SystemExit):
    """Raised after the checkpoint that a preemption signal asked for has been written. As a
    SystemExit it ends the process with status `code` (fault.preempt_exit_code) unless caught."""


# --------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------


class Faults:
    """The named points of a run where a fault can be injected; all no-ops."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def gradients(self, step: int, params: list[torch.Tensor]) -> None:
        pass

    def before_update(self, step: int) -> None:
        pass

    def after_update(self, step: int, params: list[torch.Tensor]) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def forces_checkpoint(self, step: int) -> bool:
        return False

    def checkpoint_write(self, step: int, ckpt: dict, path: Path) -> None:
        pass


NO_FAULTS = Faults()


class FaultInjector(Faults):
    """Faults from a `DebugConfig`: kill (SIGKILL) or hang this rank at a step and a point of it,
    a NaN loss or an inf gradient at given steps, a NaN weight after the update of given steps (a
    finite loss and gradient, a broken update: `optim.eps=0`), half a checkpoint on disk then death."""

    def __init__(self, debug, rank: int):
        self.d, self.rank = debug, rank

    def _here(self, when: str, step: int) -> bool:
        d = self.d
        return (d.kill_at_step == step and d.kill_when.value == when
                and (d.kill_rank is None or d.kill_rank == self.rank))

    def _die(self) -> None:
        if self.d.kill_how.value == "hang":  # a stuck rank: alive, never answering
            log.warning("debug: rank %d hangs at step %d", self.rank, self.d.kill_at_step)
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no final checkpoint

    def loss(self, step, loss):
        return loss * float("nan") if step in self.d.nan_loss_at_steps else loss  # hence NaN gradients

    def gradients(self, step, params):
        if step in self.d.nan_grad_at_steps:  # a finite loss, an inf gradient
            with torch.no_grad():
                next(p.grad for p in params if p.grad is not None).view(-1)[0] = float("inf")

    def before_update(self, step):
        if self._here("mid_step", step):
            self._die()

    def after_update(self, step, params):
        if step in self.d.nan_weights_at_steps:  # what an update dividing by zero leaves
            with torch.no_grad():
                local = getattr(params[0], "to_local", lambda: params[0])()
                local.view(-1)[0] = float("nan")

    def after_step(self, step):
        if self._here("after_step", step):
            self._die()

    def forces_checkpoint(self, step):
        return self.d.kill_at_step == step and self.d.kill_when.value == "checkpoint_write"  # every rank

    def checkpoint_write(self, step, ckpt, path):
        """Start the atomic write of `ckpt` as `save_atomic` does, and die with half of it on disk."""
        if not self._here("checkpoint_write", step):
            return
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        data = buffer.getbuffer()

        def write(tmp: Path) -> None:  # inside the real temp-file-and-rename path
            with open(tmp, "xb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            self._die()

        write_atomic(path, write)


def make_faults(debug, rank: int) -> Faults:
    """The injector for `debug` (a DebugConfig), or the no-op `Faults` when nothing is set."""
    d = debug
    if d.kill_at_step is None and not d.nan_loss_at_steps and not d.nan_grad_at_steps and not d.nan_weights_at_steps:
        return NO_FAULTS
    return FaultInjector(d, rank)


# --------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------


class NonFiniteGuard:
    """Decides, after each backward pass, whether the step's update is applied: not when the loss
    or the gradient norm is NaN/inf on any rank. Also carries a preemption signal received by
    any rank to all of them. Counts skipped steps in total and in the current unbroken streak
    (`counts`, saved in checkpoints) and stops the run after `max_bad` in a row."""

    def __init__(self, max_bad: Optional[int], env: DistEnv, watch_signals: bool, counts: Optional[dict] = None):
        self.max_bad, self.env, self.watch_signals = max_bad, env, watch_signals
        self.counts = dict(counts or {"total": 0, "consecutive": 0})
        self.received = lambda: False  # set by the trainer: has this rank received a preemption signal
        self.weights: list[torch.Tensor] = []  # set by the trainer: checked when a step is non-finite
        self.updated, self.preempt, self.weights_bad = True, False, False

    def update_if(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """(The step's `update_if`.) One all-reduce of two numbers and one host sync per step,
        done only when a check needs it; every rank gets the same answer."""
        preempt = bool(self.received())
        check = self.max_bad is not None
        if not check and not (self.env.distributed and self.watch_signals):
            self.updated, self.preempt = True, preempt
            return True
        device = loss.device
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) if check else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([bad.float().to(device), torch.tensor(float(preempt), device=device)])
        bad, self.preempt = (v > 0 for v in all_reduce_sum(flags, self.env).tolist())
        if bad and self.weights:  # only on a bad step (no cost otherwise): did an earlier update break the weights?
            local = torch.tensor(float(not all_finite(self.weights)), device=device)
            self.weights_bad = all_reduce_sum(local, self.env).item() > 0
        self.updated = not bad  # no optimizer or EMA update: the weights stay as they were
        return self.updated

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, last_ckpt: Optional[Path]) -> None:
        """Count the step; raise NonFiniteTrainingError when the streak reaches `max_bad`."""
        if self.updated:
            self.counts["consecutive"] = 0
            return
        self.counts["total"] += 1
        self.counts["consecutive"] += 1
        if self.weights_bad:  # skipping steps cannot mend them: stop now
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: the weights are NaN/inf, made so by the update of an earlier step "
                "whose loss and gradient were finite; no checkpoint holds them (a checkpoint with a non-finite "
                f"tensor is never written). The newest checkpoint, {last_ckpt}, is finite and a relaunch resumes "
                "from it. Fix: raise optim.eps (0 divides by zero), lower optim.lr, set optim.grad_clip, or use "
                "precision=fp32"
            )
        log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped "
                    "(%d in a row, %d in total; the run stops at %d in a row)", step, loss.item(),
                    grad_norm.item(), self.counts["consecutive"], self.counts["total"], self.max_bad)
        if self.max_bad is not None and self.counts["consecutive"] >= self.max_bad:
            max_bad = self.max_bad
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: the loss or gradient was NaN/inf in {max_bad} consecutive "
                f"steps, {step - max_bad + 1}..{step} (their updates were skipped; no checkpoint was written). "
                f"The newest checkpoint, {last_ckpt}, is intact and a relaunch resumes from it. Fix: lower "
                "optim.lr, set optim.grad_clip, use precision=fp32, or check the data "
                f"(fault.max_nonfinite_steps={max_bad} sets the limit)"
            )


def named_tensors(obj, prefix: str = ""):
    """(dotted name, tensor) of every floating-point tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def all_finite(tensors) -> bool:
    """Whether every entry of `tensors` (this rank's shards of DTensors) is finite. One host sync."""
    local = [getattr(t, "to_local", lambda t=t: t)().detach() for t in tensors]
    flags = [torch.isfinite(t).all() for t in local if t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_entries(state: dict) -> list[str]:
    """Names of the tensors in `state` (a checkpoint's model, ema, opt, ...) holding a NaN or inf.
    One check over all of them first (one host sync); names are looked up only when one is bad."""
    named = list(named_tensors(state))
    if all_finite([t for _, t in named]):
        return []
    return [name for name, t in named if not all_finite([t])]


# --------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------


class PreemptionWatch:
    """Turns the preemption signals into a flag that the loop reads at step boundaries (a
    handler that only sets a flag is safe whatever the process is doing when the signal comes).

    Installed first thing, before start-up (data indexing, VAE and checkpoint loading: minutes at
    scale); `train.py` holds the signals from its first line until then (dit/preemption.py). Until
    `started()` (the loop begins) a signal ends the process at once with
    TrainingPreempted(`exit_code`), writing nothing: there is no progress to save yet, and the
    scheduler's kill follows the signal within seconds.

    Handlers installed before (submitit's requeue handler on SIGUSR2, say) are remembered:
    `hand_over()` calls the one of the signal received, once the checkpoint is written. All
    handlers are restored on exit. Signals can only be handled in the main thread; elsewhere
    (a test calling `run_training` from a thread) the watch does nothing."""

    def __init__(self, signums: tuple[int, ...], exit_code: int = 75):
        self.signums, self.exit_code = tuple(signums), exit_code
        self.previous: dict[int, object] = {}
        self.received: Optional[int] = None
        self.starting = True
        self.preempted_at_start_up = False

    def started(self) -> None:
        """The loop begins: from now on a signal is acted upon at the next step boundary."""
        self.starting = False

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self.starting:
            self.starting = False  # once
            self.preempted_at_start_up = True
            log.warning("preempted (%s) during start-up, before the first step: nothing written; exiting with "
                        "status %d so that the launcher requeues the job; relaunching the same command resumes "
                        "from the newest checkpoint", self.signal_name, self.exit_code)
            self.hand_over()  # the launcher's own handler (submitit: requeue), if any
            raise TrainingPreempted(self.exit_code)

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            if self.signums:
                log.warning("not in the main thread: preemption signals are not handled")
            return self
        # train.py guarded the default signals from its first line (dit/preemption.py): the handlers
        # from before that guard are the ones to hand over to and to restore, never the guard's.
        guarded = take_over(self.signums)
        for signum in self.signums:
            previous = signal.signal(signum, self._handle)
            self.previous[signum] = guarded.get(signum, previous)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        # The start-up signal's TrainingPreempted is raised wherever the process is: inside a
        # library (omegaconf building the config, an import) it can be swallowed or replaced by
        # another error on the way out (a half-built object failing in a cleanup). The signal was
        # received all the same: the process still ends as preempted, not as a failure.
        if self.preempted_at_start_up and exc is not None and not isinstance(exc, TrainingPreempted):
            log.warning("the start-up preemption surfaced as %s: exiting with status %d all the same",
                        type(exc).__name__, self.exit_code)
            raise TrainingPreempted(self.exit_code) from exc

    def hand_over(self) -> None:
        handler = self.previous.get(self.received)
        if callable(handler):
            handler(self.received, None)


def preemption_signals(names) -> tuple[int, ...]:
    """The signal numbers of `fault.preempt_signals` (unknown names are left to check_static)."""
    return tuple(getattr(signal, str(n)) for n in names if isinstance(getattr(signal, str(n), None), signal.Signals))


def ignore_signals(signums: tuple[int, ...], worker_id: int) -> None:
    """DataLoader worker_init_fn: the workers ignore the preemption signals (see DataStream)."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
