"""The training schema: every knob of `train.py` and its default, in one place (the YAML files
under conf/ only select and override these dataclasses)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from dit.flow.meanflow import MeanFlowOptions
from dit.models import DiTConfig
from dit.sampling.settings import SamplerSettings


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


class Precision(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # torch.autocast(bfloat16) around the forward pass and the loss
    # torch.autocast(float16) and a gradient scaler (torch.amp.GradScaler): for GPUs without
    # bfloat16 (V100, T4). Not under parallel=fsdp with more than one rank.
    fp16 = "fp16"


class Schedule(enum.Enum):
    """The learning rate after the warmup (formulas: `dit.train.optimizer.learning_rate`)."""

    constant = "constant"  # optim.lr throughout (the paper)
    cosine = "cosine"  # half a cosine from optim.lr down to optim.min_lr at optim.decay_steps
    linear = "linear"  # a straight line from optim.lr down to optim.min_lr at optim.decay_steps


class Parallel(enum.Enum):
    ddp = "ddp"  # DistributedDataParallel: full replica per rank (the reference's choice)
    fsdp = "fsdp"  # FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded


class WandbMode(enum.Enum):
    online = "online"
    offline = "offline"  # written under <run dir>/wandb; `wandb sync` uploads it later
    disabled = "disabled"


# --------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """A DiT. `name` is an official name (`DiT-XL/2`); the four architecture fields default to
    that model's values (the table in `dit/models/dit.py`) and can be set one by one
    (`model.depth=6`) for small experiments. With `name: null` all four must be set."""

    name: Optional[str] = "DiT-XL/2"
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    # The defaults below are DiTConfig's (dit/models/dit.py), where they are written once.
    mlp_ratio: float = DiTConfig.mlp_ratio
    class_dropout_prob: float = DiTConfig.class_dropout_prob  # label dropout for CFG training (the paper's 0.1)
    learn_sigma: bool = DiTConfig.learn_sigma  # predict the variance too (DiT's hybrid loss)
    # Architecture options (LightningDiT's; dit/models/layers.py); the defaults are the official DiT.
    norm: str = DiTConfig.norm  # layernorm | rmsnorm
    mlp: str = DiTConfig.mlp  # gelu (tanh GELU) | swiglu
    rope: bool = DiTConfig.rope  # 2-D rotary embedding on q and k
    qk_norm: bool = DiTConfig.qk_norm  # per-head norm of q and k
    modulation: str = DiTConfig.modulation  # | scale_gate (LightningDiT's shift-free adaLN)


@dataclass
class DataConfig:
    """Fields shared by every data source; `kind` selects the subclass."""

    kind: str = MISSING
    # DataLoader worker processes per rank (0: load in the training process); null: what the
    # machine has, min(4, usable CPUs / ranks on the node) (dit/data/workers.py). Never changes the data.
    num_workers: Optional[int] = None
    # Resuming checks that the data is the one the checkpoint was trained on (its classes and a
    # fingerprint of its files); true continues on purpose on changed data (a warning, not an error).
    allow_changed: bool = False


@dataclass
class ImageFolderDataConfig(DataConfig):
    """Images in `root/<class>/<image>` (labels = sorted folder names), ADM center crop to
    `image_size`, random horizontal flip; encoded by the autoencoder on the fly."""

    kind: str = "imagefolder"
    root: str = MISSING
    image_size: int = 256
    hflip: bool = True
    skip_bad: bool = False  # skip unreadable images with a warning instead of failing
    # Decode every image once before training, so a bad file stops the run (or, with skip_bad,
    # is dropped and counted) at start-up rather than at the step that first draws it.
    scan: bool = False


@dataclass
class LatentsDataConfig(DataConfig):
    """A latents cache written by `python -m dit.cache_latents` (posterior moments of each image
    and its mirror); the image size, latent shape and autoencoder come from the cache."""

    kind: str = "latents"
    root: str = MISSING
    image_size: Optional[int] = None  # None: the cache's; set: must equal the cache's (a check)
    hflip: bool = True  # pick the stored mirror at random (needs a cache built with flips)


@dataclass
class ToyDataConfig(DataConfig):
    """The built-in toy set (`dit/data/toy.py`): ten classes of coloured shapes drawn from `seed`.
    `variant`: "colours" (a colour per class) or "shapes" (random hues, equal areas: the classes
    differ by shape only; `data=toy_shapes`)."""

    kind: str = "toy"
    variant: str = "colours"  # dit.data.toy.VARIANTS
    num_per_class: int = 100
    image_size: int = 32
    seed: int = 0  # which images; the training seed (`seed`) fixes the order and the flips
    hflip: bool = True
    num_workers: int = 0  # the images are in memory already


@dataclass
class AutoencoderConfig:
    """The autoencoder: `pixel` (identity), `sd-ema`, `sd-mse`, a hub id or a local directory
    written by `AutoencoderKL.save_pretrained`. Chosen with `vae=...` (conf/vae/; in training
    the default is `sd-ema`, the paper's, in conf/train.yaml); `vae=DIR` (or `vae=local
    vae.name=DIR`) for a directory."""

    name: str = MISSING
    scale_factor: Optional[float] = None  # None: the VAE's own (0.18215 for the SD VAEs)
    # latents = (z - shift_factor - latents_mean[c]) * scale_factor / latents_std[c] (diffusers'
    # convention). None: the VAE config's (SD's have none: z * 0.18215). Per-channel stats:
    # `python -m dit.latent_stats` measures them; given here without scale_factor, the scale is 1.
    shift_factor: Optional[float] = None
    latents_mean: Optional[list[float]] = None
    latents_std: Optional[list[float]] = None


@dataclass
class VAEConfig(AutoencoderConfig):
    """The training autoencoder: which one (`AutoencoderConfig`) and how images are encoded."""

    sample_posterior: bool = True  # train on posterior samples (the reference) or on the mean


@dataclass
class ObjectiveConfig:
    """What the model is trained to do, chosen with `objective=diffusion|flow|meanflow` (conf/objective/).
    `diffusion`: DiT's Gaussian diffusion (the `diffusion` keys; the other keys here are unused).
    `flow`: flow matching (dit/flow/, docs/flow.md; t = 0 data, t = 1 noise) with these keys,
    whose defaults are SiT's. `meanflow`: MeanFlow (docs/meanflow.md) on the linear path with
    these time keys (conf/objective/meanflow.yaml: logit-normal(-0.4, 1)) and the `meanflow` keys.
    Checkpoints record the whole block as `config.objective`, which is what sampling reads to pick
    the flow sampler and rebuild the network's time input."""

    kind: str = "diffusion"  # diffusion | flow | meanflow
    path: str = "linear"  # linear | gvp (REPA: cosine)
    prediction: str = "velocity"  # velocity | noise | score (these two train on t in [1e-3, 1 - 1e-3], as SiT)
    time_sampling: str = "uniform"  # uniform | logit_normal (SD3 / LightningDiT)
    logit_mean: float = 0.0  # logit-normal: logit(t) ~ N(logit_mean, logit_std); > 0 favours noisy times
    logit_std: float = 1.0
    cosine_weight: float = 0.0  # + w * (1 - cos(v_hat, v)): LightningDiT's velocity-direction loss (w = 1)
    network_time_scale: float = 1.0  # the timestep embedder receives scale * t: 1 (SiT, REPA) or 1000


@dataclass
class MeanFlowConfig:
    """MeanFlow's training options (objective=meanflow; dit/flow/meanflow.py `MeanFlowOptions`,
    whose defaults, the official code's, are these; docs/meanflow.md). Unused by other objectives."""

    fraction_r_equals_t: float = MeanFlowOptions.fraction_r_equals_t  # share of each batch with r = t
    omega: float = MeanFlowOptions.omega  # guidance folded into the target (1 and kappa 0: none)
    kappa: float = MeanFlowOptions.kappa  # effective scale omega / (1 - kappa): MF-B/4's 1.0, 0.5 -> 2
    guidance_interval: list[float] = field(default_factory=lambda: list(MeanFlowOptions.guidance_interval))
    norm_p: float = MeanFlowOptions.norm_p  # adaptive weight 1 / (||Delta||^2 + norm_eps)^norm_p
    norm_eps: float = MeanFlowOptions.norm_eps  # (||Delta||^2 summed over the dimensions, as the code)


@dataclass
class DiffusionConfig:
    noise_schedule: str = "linear"  # betas 1e-4 ... 0.02
    diffusion_steps: int = 1000


@dataclass
class RepaConfig:
    """REPA (dit/models/repa.py, docs/repa.md): align the tokens after block `depth` to a frozen encoder's
    patch features through a projector MLP, loss weight `coeff`. Off while `encoder` is null.
    Defaults: the paper's for SiT-XL/2 (k = 8, lambda = 0.5, DINOv2-B/14 at 224 px)."""

    # timm id (vit_base_patch14_dinov2.lvd142m), torch.hub id (facebookresearch/dinov2:dinov2_vitb14),
    # or a local directory written by timm's save_for_hf; null: REPA off
    encoder: Optional[str] = None
    encoder_weights: Optional[str] = None  # a local weights file for a timm id (instead of the hub)
    # A torch.hub id runs its repository's hubconf.py (Python code from the hub cache): allowed only
    # for the known encoders' repositories (dit.models.repa.KNOWN_HUB_REPOS) and only with this set
    trust_hub_repo: bool = False
    resolution: int = 224  # images are resized to this side before the encoder (224 / 14 = 16 tokens a side)
    depth: int = 8  # k: the projector reads the output of block k (1-based)
    coeff: float = 0.5  # lambda: loss = main loss + coeff * REPA loss
    projector_dim: int = 2048  # hidden width of the projector MLP


@dataclass
class OptimConfig:
    """AdamW; by default the paper's constant learning rate (lr 1e-4, no weight decay, no
    warmup), one backward pass per step."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: Optional[float] = None  # max global grad norm; None: no clipping (the paper)
    fused: Optional[bool] = None  # fused AdamW kernel; None: on (CPU and CUDA) except under FSDP
    # Gradient accumulation: each rank's share of global_batch_size is run as this many equal
    # micro-batches (forward + backward each) before one update; the update is the one of the
    # whole batch (up to float rounding). Memory: the activations of one micro-batch.
    grad_accum_steps: int = 1
    # Learning rate at step n (1-based): optim.lr * n / warmup_steps while n <= warmup_steps,
    # then `schedule` from optim.lr to min_lr over steps warmup_steps..decay_steps (then min_lr).
    warmup_steps: int = 0
    schedule: Schedule = Schedule.constant
    min_lr: float = 0.0  # the end of a cosine or linear schedule
    decay_steps: Optional[int] = None  # where the decay ends; None: max_steps
    # precision=fp16 only: the gradient scaler's first loss scale and the number of steps
    # without overflow after which it doubles (an overflow halves it and skips the update).
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000


@dataclass
class EMAConfig:
    decay: float = 0.9999  # the paper's EMA of the weights, updated after every step


@dataclass
class CheckpointConfig:
    every: int = 50_000  # steps between checkpoints (one is also written at the end)
    # Also save when this many minutes have passed since the last save (checked every log.every
    # steps), so a preempted or crashed job loses at most about this much work. None: off.
    every_minutes: Optional[float] = 60.0
    keep_last: Optional[int] = 3  # delete older checkpoints beyond the newest N; None keeps all
    keep_every: Optional[int] = None  # also keep every checkpoint whose step is a multiple of this


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled
    project: str = "dit"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SampleGridConfig(SamplerSettings):
    """Sample grids from the EMA model (fixed noise and classes) every `every` steps, written as
    PNG under `<run dir>/samples/` and logged to wandb. 0 turns them off. The sampler keys are
    `SamplerSettings`' (log.samples.cfg_scale, .sampler, .num_steps, .guided_channels, ...), with
    grid defaults: guidance 4.0 (the reference demo), 100 DDPM steps."""

    cfg_scale: float = 4.0
    num_steps: int = 100
    every: int = 10_000
    num_images: int = 16


@dataclass
class TrainEvalConfig(SamplerSettings):
    """Evaluation during training (docs/training.md, "Evaluation during training"): every `every`
    steps (and at max_steps) `num_samples` images from the EMA weights, sampled with these
    SamplerSettings keys (eval.sampler, eval.num_steps, eval.cfg_scale, ...; defaults: DDPM-250
    without guidance, the paper's protocol for comparing models during training) and spread over
    the ranks, scored on rank 0 against `reference` as `eval_fid.py` scores them (the same keys),
    logged as `eval/<metric>` to metrics.jsonl and wandb. 0 turns it off (the default)."""

    cfg_scale: float = 1.0
    every: int = 0
    # null: sized for the run, at most 5000 (FID-5K; dit/train/evaluation.py sized_num_samples): for
    # tracking a run; score the final checkpoint with eval_fid.py (50K)
    num_samples: Optional[int] = None
    reference: Optional[str] = None  # as eval_fid.py's `reference` (ADM batch, image folder, stats .npz)
    feature_extractor: str = "inception"  # inception | toy_judge (offline, the quickstart's)
    feature_extractor_weights: Optional[str] = None  # torch-fidelity's Inception file; None: hub cache or download
    allow_download: bool = True
    feature_batch_size: int = 64
    feature_precision: str = "fp32"
    pr_arithmetic: str = "fp32"
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # any of fid, sfid, isc, prc, kid
    labels: str = "uniform"  # uniform | balanced, as bulk.labels
    seed: int = 0  # sample i: noise and label from (seed, i); the same samples at every evaluation
    batch_size: int = 32  # per network batch; fixes which samples share a batch, as bulk.batch_size
    judge_seed: int = 0
    # toy_judge: which toy variant's judge (dit.data.toy.VARIANTS); None: the run's own (data.variant
    # when data.kind=toy, else "colours").
    judge_variant: Optional[str] = None
    cache_dir: Optional[str] = "~/.cache/dit"  # reference statistics (ref_stats/) and the toy judge
    # Keep a copy of the checkpoint with the best `best_metric` as checkpoints/best.pt (+ best.json);
    # a new best writes this step's checkpoint if none was due. keep_last never deletes it.
    keep_best: bool = False
    best_metric: str = "fid"  # lower is better for fid, sfid, kid; higher for the others


@dataclass
class LogConfig:
    every: int = 100  # steps between metric lines (loss averaged over ranks and steps)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)


@dataclass
class FaultConfig:
    """What a run does when something goes wrong (docs/reliability.md)."""

    # A step whose loss or gradient is NaN/inf is skipped (no optimizer or EMA update) and
    # counted; after this many consecutive such steps the run stops with an error, leaving the
    # newest checkpoint as it was. null: no per-step check (saves one host sync per step); a
    # non-finite mean loss then stops the run at the next log step.
    max_nonfinite_steps: Optional[int] = 10
    # On these signals (what SLURM and torchrun send before stopping a job) the run writes a
    # checkpoint at the next step boundary and exits with `preempt_exit_code`. A handler that
    # was installed before (submitit's requeue on SIGUSR2) is called after the checkpoint.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    preempt_exit_code: int = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, run me again"
    # Collectives (and so every rank, when one rank dies or hangs) fail after this long. It must
    # exceed the longest wait of one rank for another: a checkpoint write or a sample grid on rank 0.
    dist_timeout_minutes: float = 30.0


class KillWhen(enum.Enum):
    after_step = "after_step"  # right after the step (and its checkpoint, if one is due)
    mid_step = "mid_step"  # after the backward pass, before the optimizer update
    checkpoint_write = "checkpoint_write"  # halfway through writing a checkpoint at that step (rank 0)


class KillHow(enum.Enum):
    sigkill = "sigkill"  # kill -9: no cleanup, no final checkpoint
    hang = "hang"  # stop responding forever (a stuck rank; for collective-timeout tests)


@dataclass
class DebugConfig:
    """Fault injection for tests of crash recovery; never set in real runs."""

    kill_at_step: Optional[int] = None  # kill this process at that step (1-based, as logged) ...
    kill_when: KillWhen = KillWhen.after_step  # ... at this point of the step ...
    kill_how: KillHow = KillHow.sigkill  # ... in this way ...
    kill_rank: Optional[int] = None  # ... on this rank only (None: every rank)
    nan_loss_at_steps: list[int] = field(default_factory=list)  # these steps' losses become NaN
    nan_grad_at_steps: list[int] = field(default_factory=list)  # one gradient entry becomes inf
    nan_weights_at_steps: list[int] = field(default_factory=list)  # one weight becomes NaN after the update


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = MISSING  # one of the DataConfig subclasses, chosen with `data=...`
    vae: VAEConfig = field(default_factory=VAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)  # objective=meanflow's options
    repa: RepaConfig = field(default_factory=RepaConfig)  # off by default (repa.encoder=null)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)  # off unless eval.every > 0

    name: str = MISSING  # run name: the run directory is outputs/<name>, and the wandb run name
    seed: int = 0  # fixes init, data order, flips, diffusion noise and timesteps
    global_batch_size: int = 256  # summed over ranks; each rank gets global_batch_size / world
    max_steps: int = 400_000  # optimizer steps (the paper's model comparisons use 400K)
    precision: Precision = Precision.fp32
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (as the reference training script)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    parallel: Parallel = Parallel.ddp
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    # Checkpoint file or run directory to start from when the run directory has no checkpoint
    # yet (a checkpoint in the run directory always wins: it is this run's own progress).
    resume: Optional[str] = None
    # Fine-tuning: a new run (fresh optimizer, step 0) whose model and EMA start from these
    # weights: one of our checkpoints (or a run directory), a release file or a state dict
    # (.pt / .safetensors). Like resume=, used only while the run directory has no checkpoint
    # of its own. What may differ from the model built here: dit/train/init_from.py.
    init_from: Optional[str] = None
    init_from_weights: str = "ema"  # which weights of our checkpoints: ema or model
