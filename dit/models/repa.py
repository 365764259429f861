"""REPA, representation alignment (Yu et al., 2024): a training-only head that pulls the DiT's
tokens after block k towards a frozen visual encoder's patch features.

The interface the trainer uses (docs/repa.md has the user's guide):

    encoder = load_encoder("vit_base_patch14_dinov2.lvd142m", resolution=224)   # frozen, eval
    head = RepaHead(model.config.hidden_size, encoder.dim, projector_dim=2048)
    head.attach(model, depth=8)           # forward hook on model.blocks[7]: keeps its output tokens
    ...
    out = model(x_t, t, y)                # the hook captures the (N, T, D) tokens of block k
    feats = encoder(images)               # (N, T', E) from images in [-1, 1]; or from the cache
    loss = main_loss + coeff * head(feats)   # head(feats) == head.loss(feats): a scalar
    ...
    checkpoint["repa"] = {"head": head.state_dict(), ...}   # contract 8: never in the model's state dict
    head.detach()                         # removes the hook (sampling/export never see the head)

In training, `RepaTerm` bundles the head, its own AdamW, the weight and the encoder (None when
the features come from a latents cache) for `dit.train.step.train_step`; the trainer builds it
(`dit.train.trainer.build_repa`).

- `head(features)` is the mean over batch and tokens of -cos(projector(h), feature), h the
  captured tokens. Its parameters have their own optimizer (`RepaTerm.opt`): the model's
  optimizer state is keyed by the model's parameter names. Under DDP the model's wrapper does
  not know the head: `RepaTerm.sync_gradients` averages its gradients over ranks once per step.
- The hook sits on the plain model: `attach` looks through DDP's `.module` and torch.compile's
  `._orig_mod`; attach before compiling. With gradient checkpointing the block runs again in
  the backward pass and the hook captures again: harmless, the loss was taken already.
- If the encoder's token grid (T' = s'^2) differs from the DiT's (T = s^2), the encoder features
  are resampled to the DiT grid: the (E, s', s') feature map is interpolated bilinearly
  (align_corners=False, antialiased when shrinking), then each token is normalised as usual.
  The targets are fixed, so this changes only what the projector is asked to match; the
  paper's setting (DINOv2-B/14 at 224 px: 16 x 16, a 256 px image's SD-VAE latent with patch 2:
  16 x 16) needs no resampling.

The encoder: `load_encoder` takes a timm model id (pretrained weights through the Hugging Face
hub, or `weights=FILE` for a local file), a torch.hub id `owner/repo:entry` (REPA's DINOv2 is
`facebookresearch/dinov2:dinov2_vitb14`), or a local directory written by timm's
`save_for_hf` (config.json + model.safetensors, or a pickle such as pytorch_model.bin: read weights
only by `check_pickled_weights` first, a payload or anything but weights refused in one line
naming the file). A hub ViT's position table is resampled once at load to the patch grid of
`resolution` (timm's antialiased bicubic, as REPA does and as timm's loader does with `img_size`),
so every loader gives REPA's targets. It returns an `Encoder`: images in [-1, 1]
(N, 3, H, W) -> patch tokens (N, T', E), with the encoder's own resize (bicubic, to
`resolution`) and normalisation (its mean/std), frozen, in eval mode, without gradients.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dit.autoencoder import AutoencoderUnavailable

# The paper's settings (REPA, SiT-XL/2 on ImageNet 256): k = 8, lambda = 0.5, DINOv2-B/14 at
# 224 px, a three-layer SiLU projector of width 2048. The config defaults (RepaConfig) repeat these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderUnavailable(AutoencoderUnavailable):
    """The REPA encoder could not be found locally nor downloaded. A kind of the autoencoder's
    error (a frozen network's weights are missing), so the entry points report it in one line."""


# ------------------------------------------------------------------------------ the head


class RepaHead(nn.Module):
    """The projector MLP (hidden -> projector_dim -> projector_dim -> encoder_dim, SiLU between)
    and the alignment loss on the tokens a forward hook captures from the DiT.

    Initialised as REPA's: Xavier-uniform weights and zero biases on every linear layer (REPA's
    SiT applies that basic init to the whole model, its projectors included: models/sit.py:210-219
    of sihyun-yu/REPA@67f7145). The weights are drawn from torch's default generator, so a seed
    set before construction fixes them (the trainer seeds it with the run's `seed`)."""

    def __init__(self, hidden_size: int, encoder_dim: int, projector_dim: int = 2048):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, encoder_dim),
        )
        self.reset_parameters()
        self.depth: int | None = None
        self._hook = None
        self._tokens: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """REPA's init: Xavier-uniform weights, zero biases, layer by layer in order."""
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def attach(self, model: nn.Module, depth: int) -> "RepaHead":
        """Capture the output tokens (N, T, D) of `model.blocks[depth - 1]` on every forward."""
        model = unwrap(model)
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise TypeError(f"REPA attaches to a model with `.blocks`; got {type(model).__name__}")
        if not 1 <= int(depth) <= len(blocks):
            raise ValueError(
                f"repa.depth={depth} is not a block of this model (depth {len(blocks)}): use 1..{len(blocks)}"
            )
        self.detach()
        self.depth = int(depth)
        self._hook = blocks[self.depth - 1].register_forward_hook(self._capture)
        return self

    def detach(self) -> None:
        """Remove the hook and forget captured tokens."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._tokens = None, None

    def _capture(self, module, args, output) -> None:
        self._tokens = output

    @property
    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            raise RuntimeError("no tokens captured: attach the head and run the model's forward before its loss")
        return self._tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The REPA loss of the last forward: mean over batch and tokens of -cos(proj(h), f)."""
        h = self.tokens  # (N, T, D)
        n, t = h.shape[:2]
        features = resample_tokens(features.detach(), t).to(h.device)  # (N, T, E)
        if features.shape[0] != n:
            raise ValueError(f"REPA features are for {features.shape[0]} images, the model's batch has {n}")
        z = self.projector(h)  # (N, T, E)
        if z.shape[-1] != features.shape[-1]:
            raise ValueError(
                f"REPA features have dimension {features.shape[-1]}, the projector outputs {z.shape[-1]}: "
                "build the head with the encoder's dim"
            )
        cos = (F.normalize(z.float(), dim=-1) * F.normalize(features.float(), dim=-1)).sum(-1)  # (N, T)
        return -cos.mean()

    loss = forward


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def resample_tokens(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, T', E) tokens of a square s' x s' grid -> (N, T, E) on the s x s grid, T = s^2, by
    bilinear interpolation of the (E, s', s') map (antialiased when shrinking)."""
    n, t_in, e = features.shape
    if t_in == num_tokens:
        return features
    s_in, s_out = round(t_in ** 0.5), round(num_tokens ** 0.5)
    if s_in * s_in != t_in or s_out * s_out != num_tokens:
        raise ValueError(f"REPA resamples square token grids only: got {t_in} encoder and {num_tokens} DiT tokens")
    grid = features.transpose(1, 2).reshape(n, e, s_in, s_in).float()
    grid = F.interpolate(grid, size=(s_out, s_out), mode="bilinear", align_corners=False, antialias=s_out < s_in)
    return grid.reshape(n, e, num_tokens).transpose(1, 2).to(features.dtype)


# ------------------------------------------------------------------------------ in the training step


class RepaTerm:
    """What the training step needs of REPA: the head (hooked on the model), its own AdamW
    (`opt`; the model's optimizer state is keyed by the model's parameter names, so the
    projector's lives apart: the same hyperparameters and learning rate make the pair one AdamW),
    the weight `coeff`, and the features of a batch: the frozen `encoder`'s of the images on
    the fly, or the cached ones handed in with the batch (`encoder=None`).

    The step calls, per micro-batch, `features(items, cached)` before the items become latents,
    then the model's forward (the hook captures block k), then `loss(features)`; once after the
    last backward pass `sync_gradients()` averages the projector's gradients over ranks (the
    model's DDP wrapper does not know the head). `last_loss` is the step's REPA loss (detached,
    the mean over its micro-batches), for the metrics."""

    def __init__(self, head: RepaHead, coeff: float, encoder: "Encoder | None" = None,
                 opt: "torch.optim.Optimizer | None" = None):
        self.head, self.coeff, self.encoder, self.opt = head, float(coeff), encoder, opt
        self.last_loss: torch.Tensor | None = None

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.head.parameters() if p.requires_grad]

    def features(self, items: torch.Tensor, cached: torch.Tensor | None) -> torch.Tensor:
        """(N, T', E) targets of a micro-batch: the cached features, else the encoder's of `items`
        (images in [-1, 1])."""
        if cached is not None:
            return cached.to(items.device, non_blocking=True).float()
        if self.encoder is None:
            raise RuntimeError("REPA has no encoder and the batch brought no cached features: build the "
                               "term with the encoder, or train from a cache built with repa_encoder=")
        return self.encoder(items)

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forget(self) -> None:
        """Drop the captured tokens (they hold the step's activations until the next forward)."""
        self.head._tokens = None

    def sync_gradients(self) -> None:
        """Average the projector's gradients over ranks (one all-reduce of all of them)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# ------------------------------------------------------------------------------ the encoder


class Encoder(nn.Module):
    """A frozen image encoder: images in [-1, 1] (N, 3, H, W) -> patch tokens (N, T', E)."""

    def __init__(self, net: nn.Module, name: str, resolution: int, mean, std, tokens_fn, dim: int):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name, self.resolution, self.dim = str(name), int(resolution), int(dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._tokens_fn = tokens_fn
        self.train(False)

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # frozen: always eval (dropout, norms), whatever the parent says

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the REPA encoder takes RGB images (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = (images.float().to(self.mean.device) + 1) / 2  # [0, 1]
        if x.shape[-2:] != (self.resolution, self.resolution):
            # bicubic as REPA; resizing and the per-channel normalisation commute (weights sum to 1)
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        dtype = next(self.net.parameters()).dtype
        return self._tokens_fn(self.net, x.to(dtype)).float()  # (N, T', E)

    def to_dict(self) -> dict:
        """What a features cache records to check it against a training config."""
        return {"name": self.name, "resolution": self.resolution, "dim": self.dim}


def _timm_tokens(net, x):
    out = net.forward_features(x)
    if out.ndim == 4:  # a convolutional net's (N, C, h, w) map: its h x w positions are the tokens
        return out.flatten(2).transpose(1, 2)
    return out[:, getattr(net, "num_prefix_tokens", 0):]  # a ViT's: drop class/register tokens


def _create_timm(timm, name: str, resolution: int, **kwargs):
    """timm.create_model with the input side set where the architecture has one (ViTs: their
    position table is resampled to it at load); convolutional nets take any side as they are."""
    try:
        return timm.create_model(name, img_size=int(resolution), **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **kwargs)


# A save_for_hf directory's weights: model.safetensors (what save_for_hf(safe_serialization=True)
# writes), which timm reads first; without it, timm reads a pickle (pytorch_model.bin, the default
# of save_for_hf, or another *.bin / *.pth file).
SAFE_WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".tar", ".ckpt")
_SAFE_FIX = ("write the encoder's weights as safetensors, in a process that trusts the file: "
             "timm.models.save_for_hf(model, DIR, model_args=..., safe_serialization=True)")


def _holds_tensors(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def check_pickled_weights(file: Path) -> None:
    """Read the pickle `file` weights only (`dit.io.checkpoint.load_state`: no code stored in it
    runs) before timm reads it, and refuse it in one line naming it and the fix when it holds
    Python objects (a payload), is not readable, or holds no weights (a state dict of tensors,
    possibly under timm's `state_dict` / `model` keys). timm's own refusal is a raw RuntimeError
    that advises retrying with weights_only=False; its other failures are tracebacks."""
    from dit.io.checkpoint import CheckpointError, load_state

    try:
        obj = load_state(file)
    except CheckpointError as err:
        raise EncoderUnavailable(f"REPA encoder weights {file} cannot be used: {err}; {_SAFE_FIX}") from None
    keys = ("state_dict_ema", "model_ema", "state_dict", "model")
    nested = [obj.get(key) for key in keys] if isinstance(obj, dict) else []
    if not (_holds_tensors(obj) or any(_holds_tensors(part) for part in nested)):
        raise EncoderUnavailable(f"REPA encoder weights {file} hold no weights (a pickled {type(obj).__name__}, "
                                 f"not a state dict of tensors); {_SAFE_FIX}")


def encoder_pickles(folder: Path) -> list[Path]:
    """The pickle files timm may read as the weights of the save_for_hf directory `folder`: none
    when it holds model.safetensors, else every *.bin / *.pth / *.pt / *.tar / *.ckpt file in it."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES) and p.is_file())


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text[:limit] + ("..." if len(text) > limit else "")


def _hub_tokens(net, x):
    out = net.forward_features(x)
    return out["x_norm_patchtokens"] if isinstance(out, dict) else out  # DINOv2's hub models: a dict


def _resize_hub_pos_embed(net: nn.Module, grid: int) -> None:
    """Resample a torch.hub ViT's absolute position table once, to the `grid` x `grid` patches of
    the encoder's resolution, as REPA does after loading DINOv2 (utils.py:95-98 of
    sihyun-yu/REPA@67f7145): timm's `resample_abs_pos_embed`, bicubic with antialiasing, the
    class token's entry kept. DINOv2 then finds the table the size of the input's grid and uses it
    as it is, instead of interpolating the 37 x 37 table of its 518 px training at every call
    (bicubic without antialiasing: other targets). timm's loader resamples its table the same way
    at load (`img_size`), so both loaders give REPA's targets. A model without a `pos_embed`
    table is left as it is."""
    from timm.layers import resample_abs_pos_embed

    table = getattr(net, "pos_embed", None)
    if not isinstance(table, torch.Tensor) or table.ndim != 3:
        return
    prefix = int(getattr(net, "num_tokens", 1))  # DINOv2: the class token (registers have no position)
    side = round((table.shape[1] - prefix) ** 0.5)
    if side * side != table.shape[1] - prefix:
        raise EncoderUnavailable(f"the torch.hub encoder's position table has {table.shape[1]} entries: not "
                                 f"{prefix} prefix token(s) and a square grid, so it cannot be resized to "
                                 f"{grid} x {grid}")
    with torch.no_grad():
        table.data = resample_abs_pos_embed(table.data, [grid, grid], num_prefix_tokens=prefix)


def _timm_encoder(net, name: str, resolution: int) -> Encoder:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return Encoder(net, name, resolution, mean, std, _timm_tokens, net.num_features)


def _offline_hint(name: str) -> str:
    return (
        "Either fetch it on a machine with network access and copy the Hugging Face / torch hub cache "
        "(HF_HOME, TORCH_HOME), or save it there with timm: "
        f"`timm.models.save_for_hf(timm.create_model({name!r}, pretrained=True, num_classes=0, img_size=224), DIR, "
        "model_args=dict(img_size=224), safe_serialization=True)` and pass the directory DIR; "
        "set HF_HUB_OFFLINE=1 to skip network attempts."
    )


# torch.hub repositories whose hubconf.py REPA may run, and only with the explicit opt-in
# (repa.trust_hub_repo=true): loading a hub id imports that repository's hubconf.py from the hub
# cache (TORCH_HOME), Python code that anyone able to write to the cache could have planted.
# DINOv2's is REPA's own loader; other encoders load through timm (weights only) or save_for_hf.
KNOWN_HUB_REPOS = ("facebookresearch/dinov2",)


def hub_id(source: str) -> tuple[str, str] | None:
    """(repo, entry) of a torch.hub id `owner/repo:entry`, or None for anything else (a timm id,
    `hf-hub:...`, a path)."""
    head = source.split(":", 1)[0]
    if ":" not in source or "/" not in head or source.startswith(("hf-hub:", ".", "/", "~")):
        return None
    repo, entry = source.split(":", 1)
    return repo, entry


def hub_trust_refusal(source: str, trust_hub_repo: bool, key: str = "repa.trust_hub_repo") -> str | None:
    """Why the torch.hub id `source` may not be loaded, or None (not a hub id, or a known
    repository with the opt-in `key` set). Never trusted implicitly: torch.hub runs the cached
    hubconf.py of the repository without a prompt once it is trusted."""
    parsed = hub_id(source)
    if parsed is None:
        return None
    repo, _ = parsed
    weights_only = ("the timm id vit_base_patch14_dinov2.lvd142m (weights only) or a directory written by "
                    "timm.models.save_for_hf")
    if repo not in KNOWN_HUB_REPOS:
        return (f"REPA encoder {source!r} is a torch.hub id of {repo}, not one of the known encoder repositories "
                f"({', '.join(KNOWN_HUB_REPOS)}): loading it would run that repository's hubconf.py; "
                f"use {weights_only}")
    if not trust_hub_repo:
        return (f"REPA encoder {source!r} is a torch.hub id: loading it runs the Python code of {repo} "
                f"(its hubconf.py from the hub cache, TORCH_HOME): set {key}=true to trust that repository, "
                f"or use {weights_only}")
    return None


def check_encoder_source(source: str, trust_hub_repo: bool = False, key: str = "repa.trust_hub_repo") -> None:
    """The cheap part of `load_encoder`'s checks, for entry points to run before any weights load:
    a path (starting with `.`, `/` or `~`, or existing) must be a save_for_hf directory; a
    torch.hub id must name a known repository and come with the opt-in `key`=true."""
    path = Path(source).expanduser()
    if not path.exists():
        refusal = hub_trust_refusal(source, trust_hub_repo, key)
        if refusal is not None:
            raise EncoderUnavailable(refusal)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderUnavailable(
                f"REPA encoder directory {source!r} has no config.json: write it with "
                "timm.models.save_for_hf(model, DIR, model_args=..., safe_serialization=True)"
            )
    elif source.startswith((".", "/", "~")) or path.exists():
        raise EncoderUnavailable(
            f"REPA encoder directory {source!r} does not exist or is not a directory: pass a folder written by "
            "timm.models.save_for_hf, a timm model id such as vit_base_patch14_dinov2.lvd142m, or a torch.hub "
            "id such as facebookresearch/dinov2:dinov2_vitb14"
        )


def load_encoder(name_or_dir: str, resolution: int = 224, weights: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trust_hub_repo: bool = False, trust_key: str = "repa.trust_hub_repo") -> Encoder:
    """The frozen REPA encoder named by a local directory (timm `save_for_hf`), a torch.hub id
    `owner/repo:entry`, or a timm model id (`weights=FILE`: its weights from a local file
    instead of the hub). `resolution`: the side images are resized to before encoding.
    A hub id runs its repository's hubconf.py: only a known repository (`KNOWN_HUB_REPOS`), only
    with `trust_hub_repo=True` (the config key `trust_key`), else EncoderUnavailable."""
    import timm  # heavy (about a second): only runs that use REPA pay for it, not every `import dit.train`

    source = str(name_or_dir)
    path = Path(source).expanduser()
    kwargs = dict(num_classes=0)
    check_encoder_source(source, trust_hub_repo, trust_key)  # before torch.hub imports any hubconf.py
    if path.is_dir():
        for pickled in encoder_pickles(path):  # a pickle is read weights only, by us, before timm reads it
            check_pickled_weights(pickled)
        try:
            net = _create_timm(timm, f"local-dir:{path.resolve()}", resolution, pretrained=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - timm raises many types for a folder it cannot use
            raise EncoderUnavailable(
                f"cannot load the REPA encoder directory {source!r} ({type(err).__name__}: {_one_line(err)}): "
                f"its config.json and weights must be what timm.models.save_for_hf writes; {_SAFE_FIX}"
            ) from err
        encoder = _timm_encoder(net, source, resolution)
    elif hub_id(source) is not None:
        repo, entry = hub_id(source)
        # trust_repo=True: the user opted in above (check_encoder_source); torch's own prompt would
        # block a batch job, and its "check" trusts any folder already in the cache anyway.
        try:  # a cached hub repo loads without the network (no validation of the branch)
            net = torch.hub.load(repo, entry, skip_validation=True, trust_repo=True)
        except Exception as err:  # noqa: BLE001 - torch.hub raises many types offline
            raise EncoderUnavailable(
                f"cannot load the REPA encoder {source!r} through torch.hub ({type(err).__name__}: "
                f"{str(err)[:200]}). {_offline_hint('vit_base_patch14_dinov2.lvd142m')}"
            ) from err
        patch = getattr(net, "patch_size", 14)
        if resolution % patch:
            raise ValueError(f"repa.resolution={resolution} is not a multiple of the encoder's patch size {patch}")
        _resize_hub_pos_embed(net, resolution // patch)
        encoder = Encoder(net, source, resolution, IMAGENET_MEAN, IMAGENET_STD, _hub_tokens, net.embed_dim)
    else:
        base = source.split(":", 1)[-1] if source.startswith("hf-hub:") else source.split(".")[0]
        if not source.startswith("hf-hub:") and not timm.is_model(base):
            raise EncoderUnavailable(
                f"{source!r} is not a timm model, a torch.hub id (owner/repo:entry) nor an existing directory: "
                "list timm's with timm.list_models('*dinov2*')"
            )
        overlay = {}
        if weights is not None:
            if not Path(weights).expanduser().is_file():
                raise EncoderUnavailable(f"REPA encoder weights file {weights!r} does not exist")
            if Path(weights).name.endswith(PICKLE_SUFFIXES):
                check_pickled_weights(Path(weights).expanduser())
            overlay = {"pretrained_cfg_overlay": dict(file=str(Path(weights).expanduser()))}
        try:
            net = _create_timm(timm, source, resolution, pretrained=True, **kwargs, **overlay)
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises several types offline
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
            raise EncoderUnavailable(
                f"cannot load the REPA encoder {source!r}: its weights are not in the local cache"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''} and could not be downloaded "
                f"({type(err).__name__}: {str(err)[:200]}). {_offline_hint(source)}"
            ) from err
        encoder = _timm_encoder(net, source, resolution)
    encoder.net.to(dtype=dtype)  # the normalisation buffers stay float32
    return encoder.to(device)
