"""Which configuration keys define a run, in one place: what a resumed run may change
(`RESUMABLE_CHANGES`, read by `dit.config.checks.config_mismatches`), what a sweep job's
directory name leaves out (`NOT_IN_JOB_NAME`, read by `dit.config.overrides.job_dirname`) and
which `eval.*` keys are left out of an in-training evaluation's protocol (`EVAL_SCHEDULE_KEYS`,
read by `dit.train.evaluation.protocol`, recorded in best.json).

Plain tuples of dotted keys (a key also covers its children): this module imports nothing, so
every entry point may read it at start-up.
"""

from __future__ import annotations

# How long a run goes, how it reports, where it keeps things and how fast it gets there:
# never what it computes.
NOT_RUN_DEFINING = (
    "max_steps", "ckpt", "log", "fault", "debug", "data.num_workers", "data.scan", "data.allow_changed",
    "compile", "grad_checkpointing", "device", "name",
    # The global batch stays the same, only how it is split: like a change in the number of
    # ranks, the same update up to float rounding (bitwise resume needs the same value).
    "optim.grad_accum_steps",
    # Permission to run a torch.hub encoder's code, not a setting of the encoder: a run started
    # before the key existed resumes with it set.
    "repa.trust_hub_repo",
)

# A resumed run may change these as well: what is measured while training (eval), where the
# same data lives (data.root), and where a run starts from, which is read only while the run
# directory has no checkpoint (resume, init_from, init_from_weights). Everything else defines
# the run; a mismatch in the run directory is refused.
RESUMABLE_CHANGES = (*NOT_RUN_DEFINING, "eval", "resume", "data.root", "init_from", "init_from_weights")

# A sweep job's directory name keeps eval, data.root, resume and init_from (jobs sweeping them
# are different jobs and must not resume one another) and leaves hydra's own keys out, so
# relaunching a sweep longer, with other logging or on other hardware finds the same directories.
NOT_IN_JOB_NAME = (*NOT_RUN_DEFINING, "hydra", "hydra/launcher", "hydra/job_logging")

# Keys of the `eval` node that say when an evaluation runs and what is kept, not what it
# computes: scores under settings differing only in these are compared with each other.
EVAL_SCHEDULE_KEYS = ("every", "keep_best", "best_metric", "allow_download", "feature_batch_size", "cache_dir")
