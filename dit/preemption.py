"""The preemption signals from the first line of `train.py` (and `dit-train`) on.

A training program spends its first seconds importing torch and the library and composing its
config before `run_training` enters its PreemptionWatch (dit/train/faults.py). A preemption
signal in that window (SLURM's SIGUSR1 a few seconds into a requeued job, a SIGTERM) used to
end the process with the signal's own status, 143 or 138, which a requeue recipe waiting for 75
takes for a failure. `guard_start_up()`, called before anything heavy is imported, handles the
signals from there on as the watch does during start-up: the launcher's own handler, if any,
then exit at once with status 75, writing nothing (there is nothing to save yet).

The config is not read yet, so the guard uses the defaults of `fault.preempt_signals` and
`fault.preempt_exit_code`; the watch takes the signals over (`take_over`) with the configured
ones, and gives any other signal its handler from before the guard back. This module imports
only the standard library: it runs before torch is loaded.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

START_UP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # FaultConfig.preempt_signals' default
START_UP_EXIT_CODE = 75  # FaultConfig.preempt_exit_code's default (EX_TEMPFAIL)

_before: dict[int, object] = {}  # signal -> its handler before the guard, for each signal the guard holds
_exiting = False

log = logging.getLogger(__name__)


def guard_start_up() -> None:
    """Handle the default preemption signals from now until the PreemptionWatch takes over. Only
    in the main thread (where Python runs signal handlers); calling it again changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in START_UP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signum not in _before:
            _before[signum] = signal.signal(signum, _preempted)


def _preempted(signum: int, frame) -> None:  # never returns but for a second signal
    global _exiting
    if _exiting:  # a second signal while the first one's exit is under way changes nothing
        return
    _exiting = True
    message = (f"preempted ({signal.Signals(signum).name}) during start-up, before the first step: nothing written; "
               f"exiting with status {START_UP_EXIT_CODE} so that the launcher requeues the job; relaunching the "
               "same command resumes from the newest checkpoint")
    if logging.getLogger().handlers:  # hydra has set up logging (train.log): where the watch's message goes
        log.warning(message)
    else:  # still importing: nothing is set up yet
        print(f"warning: {message}", file=sys.stderr, flush=True)
    code = START_UP_EXIT_CODE
    before = _before.get(signum)
    if callable(before):  # the launcher's own handler (submitit: requeue), as the watch hands over
        try:
            before(signum, frame)
        except SystemExit as exit_:  # the launcher ends the process itself, with its own status
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as err:  # noqa: BLE001 - still exit as preempted
            print(f"warning: the previous handler of {signal.Signals(signum).name} failed: {err!r}", file=sys.stderr)
    # Exit here, not by raising SystemExit: the signal lands in the middle of an import, and a
    # library being imported can swallow the exception or turn it into another error (numpy,
    # half imported, then recursed until a RecursionError: status 1 after seconds). Nothing needs
    # unwinding yet: no lock is taken, no file of the run is open but hydra's log, flushed here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def take_over(signums) -> dict[int, object]:
    """For PreemptionWatch.__enter__: the handlers from before the guard of the guarded signals
    among `signums`, which the watch is about to replace (it hands over to those and restores them
    on exit). Every other guarded signal gets its handler from before the guard back now (a config
    with fewer preemption signals). The guard holds nothing afterwards."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    signums = set(signums)
    handed = {}
    for signum, before in list(_before.items()):
        if signum in signums:
            handed[signum] = before  # the guard stays until the watch's handler replaces it: no gap
        else:
            signal.signal(signum, before if before is not None else signal.SIG_DFL)
        del _before[signum]
    return handed
