"""Export DiT weights for other tools: a diffusers model/pipeline folder, a hub-style folder of our
own format (`save_pretrained` / `load_pretrained`), and the upload of either (`push_to_hub`).

    python -m dit.export diffusers  CKPT OUT [--which model] [--vae DIR_OR_ID] [--scheduler ddim|dpm]
    python -m dit.export pretrained CKPT OUT
    (either: [--release-format dit|sit] for a bare state dict whose name does not say; SiT-*.pt is SiT's)
    python -m dit.export push --folder OUT --repo-id USER/NAME [--private]

CKPT is a release file (`DiT-XL-2-256x256.pt`, SiT's `SiT-XL-2-256.pt`), one of our checkpoints,
a `.safetensors` file or a folder written by `save_pretrained`. A flow-matching model (a
checkpoint whose config records `objective.kind: flow`, SiT's release) is refused by the diffusers
export (`FlowExportError`): `DiTPipeline` walks a DDPM noise-prediction chain at integer timesteps
0..999, which cannot sample a velocity model trained on t in [0, 1]. `save_pretrained` keeps it,
recording its objective so that `sample.py` samples the exported weights as it samples the
source. The diffusers export also refuses (`DiffusersExportError`, FlowExportError's parent) a
pixel-space model (`vae=pixel`: the pipeline always decodes with an AutoencoderKL) and a model of
more than 1000 classes (`DiTPipeline`'s guidance uses class id 1000 as its null class); a model of
fewer classes is exported with its null embedding at row 1000, so the pipeline's guidance works
(`to_diffusers_state_dict`). Every folder is written into a temporary sibling and renamed into
place, so a crash or a full disk never leaves half an export under OUT (a previous export there
is kept whole). An OUT that is a symlink is written through: the export goes where the link
points, the link stays. The program (its argument parsing) is dit/cli/export.py.

diffusers' `DiTTransformer2DModel` holds the same tensors as our `DiT` (mapping below), with one
numeric difference that its config cannot express: its timestep features use the frequencies
`exp(-ln(10000) i / (half - 1))` (`downscale_freq_shift=1`, hard-coded in
`CombinedTimestepLabelEmbeddings`) where DiT uses `/ half`. `load_diffusers_transformer` and
`load_diffusers_pipeline` load the folder and set the shift back to 0; a plain `from_pretrained`
loads it too, with slightly different outputs (docs/export.md has the measured sizes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from dit.autoencoder import KNOWN_VAES
from dit.io.atomic import FileWriteError, as_os_error
from dit.io.checkpoint import CONFIG_FIELDS, load_dit_checkpoint, save_weights_safetensors
from dit.io.release import release_family
from dit.diffusion import named_betas
from dit.flow.config import is_flow
from dit.models import DiT, DiTConfig, arch_name
from dit.sampling.trained import RELEASE_OBJECTIVES, objective_from_config

WEIGHTS_NAME = "model.safetensors"  # our folder: official-layout weights
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
RELEASE_LICENSE = "cc-by-nc-4.0"  # the official DiT weights


# --------------------------------------------------------------------------------------
# Reading a source
# --------------------------------------------------------------------------------------


def load_source(path: str | os.PathLike, use_ema: bool = True,
                release_format: str | None = None) -> tuple[DiT, dict]:
    """(model, meta) of a checkpoint file or a `save_pretrained` folder. meta is
    `load_dit_checkpoint`'s, plus `diffusion` ({noise_schedule, diffusion_steps}: the training
    chain, linear/1000 for release files), `objective` (the flow objective record a flow model
    was trained with, as sampling reads it: our config's `objective`, SiT's for a release file
    named `SiT-*` or `release_format="sit"`; None for a diffusion model) and `license` (the
    release's, else None)."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    model, meta = load_dit_checkpoint(path, which="ema" if use_ema else "model")
    trained = (meta.get("config") or {}).get("diffusion") or {}
    meta["diffusion"] = {"noise_schedule": str(trained.get("noise_schedule", "linear")),
                         "diffusion_steps": int(trained.get("diffusion_steps", 1000))}
    # What dit.sampling.loading.load_for_sampling decides, from the same evidence.
    objective = (objective_from_config(meta.get("config")) if meta["format"] == "ours"
                 else RELEASE_OBJECTIVES[release_family(path, release_format)])
    meta["objective"] = dict(objective) if objective is not None else None
    meta["license"] = RELEASE_LICENSE if meta["format"] == "official" else None
    meta["weights"] = "ema" if use_ema or meta["format"] == "official" else "model"
    return model, meta


# The class id `DiTPipeline.__call__` passes for the unconditional half of guidance
# (`class_null = torch.tensor([1000] * batch_size)`, hard-coded for ImageNet): the exported
# transformer's label table puts the model's null embedding at this row (`to_diffusers_state_dict`).
PIPELINE_NULL_CLASS = 1000


class DiffusersExportError(ValueError):
    """A model the diffusers export refuses before anything is written: `DiTPipeline` cannot
    sample it (a flow-matching model, a pixel-space model, more than 1000 classes)."""


class FlowExportError(DiffusersExportError):
    """A flow-matching model given to the diffusers export: `DiTPipeline` cannot sample it."""


def refuse_flow_model(source: str | os.PathLike, meta: dict) -> None:
    """FlowExportError (one line: the reason and the fix) when `meta` (`load_source`'s) is a
    flow-matching model's. diffusers' `DiTPipeline` feeds its scheduler's integer timesteps
    0..999 to the transformer as they are (its timestep embedder has no scale in its config) and
    steps a DDPM noise-prediction chain on the output, where a flow model takes t in [0, 1] and
    predicts a velocity: the exported pipeline would sample noise."""
    objective = meta.get("objective")
    if not is_flow(objective):
        return
    how = ""
    if meta.get("format") == "official":  # a bare state dict: its name, or release_format, said SiT
        how = ("; SiT's release, by its file name SiT-*: --release-format dit if it is DiT's"
               if release_family(source) == "sit" else "; SiT's release, as --release-format sit says")
    raise FlowExportError(
        f"{source} is a flow-matching model ({objective.get('path', 'linear')} path, "
        f"{objective.get('prediction', 'velocity')} prediction, time t in [0, 1]{how}): DiTPipeline's DDPM "
        "noise-prediction chain and integer timesteps 0..999 cannot sample it, so it is not exported to diffusers "
        "(nothing was written); sample it with sample.py or eval_fid.py, or export its weights with "
        "`python -m dit.export pretrained` (which records its objective for sample.py)")


def is_pixel_space(meta: dict) -> bool:
    """Whether `meta` (`load_source`'s) is a model trained on pixels (`vae=pixel`: its recorded
    autoencoder is the identity), as sample.py decides from the same record."""
    return (meta.get("autoencoder") or {}).get("name") == "pixel"


def refuse_for_pipeline(source: str | os.PathLike, meta: dict, config: DiTConfig) -> None:
    """DiffusersExportError (one line: the reason and the fix) for a model `DiTPipeline` cannot
    sample: a flow-matching model (`refuse_flow_model`); a pixel-space model (the pipeline always
    decodes with `pipe.vae`: `1 / self.vae.config.scaling_factor * latents`, so a pipeline without
    an AutoencoderKL fails at its last line, and none is the identity); a model of more than 1000
    classes (the pipeline's guidance uses class id 1000 as its null class, which would be one of
    the model's classes)."""
    refuse_flow_model(source, meta)
    fix = ("(nothing was written); sample it with sample.py or eval_fid.py, or export its weights with "
           "`python -m dit.export pretrained`")
    if is_pixel_space(meta):
        raise DiffusersExportError(
            f"{source} is a pixel-space model (trained with vae=pixel: it denoises RGB images, there is no "
            "autoencoder): DiTPipeline always decodes its output with an AutoencoderKL (pipe.vae), so it is not "
            f"exported to diffusers {fix}")
    if config.num_classes > PIPELINE_NULL_CLASS:
        raise DiffusersExportError(
            f"{source} has {config.num_classes} classes: DiTPipeline's guidance uses class id {PIPELINE_NULL_CLASS} "
            f"as its null class, which is one of this model's classes, so it is not exported to diffusers {fix}")


def check_id2label(id2label: dict | None, num_classes: int) -> dict[int, str] | None:
    """`id2label` with int keys; ValueError (one line) for a key that is not one of the model's
    class ids 0..num_classes-1 (`DiTPipeline.get_label_ids` would hand it to the model)."""
    if not id2label:
        return None
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError("id2label keys must be class ids (integers), got "
                         f"{', '.join(map(repr, list(id2label)[:5]))}") from None
    outside = sorted(k for k in labels if not 0 <= k < num_classes)
    if outside:
        shown = ", ".join(map(str, outside[:5])) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        raise ValueError(f"id2label names class id {shown}, but the model has {num_classes} classes "
                         f"(ids 0..{num_classes - 1}): fix the labels file (nothing was written)")
    return labels


# --------------------------------------------------------------------------------------
# Folders: staged in a temporary sibling, renamed into place
# --------------------------------------------------------------------------------------


# What a folder written by this module holds at its top level: save_pretrained's files, or a
# diffusers pipeline (model_index.json and our dit_export.json, its model folders, the card).
PRETRAINED_ENTRIES = frozenset({WEIGHTS_NAME, CONFIG_NAME, CARD_NAME})
DIFFUSERS_ENTRIES = frozenset({"model_index.json", "dit_export.json", CARD_NAME, "transformer", "scheduler", "vae"})
# What marks a training run's directory (dit/train: the run lock, checkpoints, hydra's config
# and log, the metrics): never replaced by an export, whatever else it holds.
RUN_ENTRIES = (".lock", "checkpoints", ".hydra", "train.log", "metrics.jsonl")


def _json_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable or not JSON: not a record of ours
        return {}
    return record if isinstance(record, dict) else {}


def previous_export(folder: str | os.PathLike) -> str | None:
    """The kind of export `folder` holds ("pretrained" or "diffusers": exactly the entries that
    `save_pretrained` or `export_diffusers` writes, with its record naming it ours), else None."""
    folder = Path(folder)
    names = {entry.name for entry in os.scandir(folder)}
    if names == PRETRAINED_ENTRIES and _json_record(folder / CONFIG_NAME).get("format") == "dit":
        return "pretrained"
    if ({"model_index.json", "dit_export.json"} <= names <= DIFFUSERS_ENTRIES
            and "model_config" in _json_record(folder / "dit_export.json")):
        return "diffusers"
    return None


def output_target(out_dir: str | os.PathLike) -> Path:
    """Where an export named `out_dir` is written: the folder a symlink points to (followed to the
    end; it may not exist yet), else `out_dir`. The link itself is never replaced: --overwrite
    through a link once put a new folder in its place and left the link behind as `.OUT.<hex>.old`."""
    out = Path(out_dir)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _named(out: Path, target: Path) -> str:
    return str(out) if target == out else f"{target} (the target of the link {out})"


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """FileExistsError unless `out_dir` may be written: it does not exist, or `overwrite` is set
    and it is an empty folder or a previous export (`previous_export`). A folder holding a
    training run (its lock, checkpoints/, .hydra/, ...) or anything else is never replaced:
    --overwrite into a live run's folder once deleted its checkpoints and lock. A symlink is
    judged by what it points to (`output_target`)."""
    out = Path(out_dir)
    target = output_target(out)
    named = _named(out, target)
    if not target.exists():
        return
    if not (overwrite and target.is_dir()):
        what = "a folder" if target.is_dir() else "not a folder"
        raise FileExistsError(f"{named} exists ({what}): choose another output folder"
                              + (" or pass overwrite=True (--overwrite)" if target.is_dir() else ""))
    names = sorted(entry.name for entry in os.scandir(target))
    run = [name for name in RUN_ENTRIES if name in names]
    if run:
        raise FileExistsError(f"{named} holds a training run ({', '.join(run)}): --overwrite replaces only a previous "
                              "export; choose another output folder (nothing was written)")
    if names and previous_export(target) is None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FileExistsError(f"{named} is not a previous export (it holds {shown}): --overwrite replaces only a "
                              "folder written by `python -m dit.export`; choose another output folder, or empty it "
                              "yourself")


class ExportWriteError(FileWriteError):
    """An export could not be written (a full disk, a quota, permissions): the OS error of the
    file being written when it failed (`filename`: that file as it would be named under the
    output folder, or the folder itself when it cannot be told). Nothing was exported: the
    output folder (a previous export in it) is unchanged."""

    def __init__(self, out: Path, file: str | None, cause: OSError, existed: bool):
        super().__init__(out / file if file else out, cause)
        self.out, self.existed = out, existed
        self.disk = output_target(out).parent  # a link's target may be on another disk

    def __str__(self) -> str:
        reason = f"{self.strerror} (errno {self.errno})" if self.errno else self.strerror
        kept = "is unchanged (the export it holds is kept)" if self.existed else "was not created"
        return (f"could not write {self.filename}: {reason}. Nothing was exported: {self.out} {kept}; free space "
                f"(or fix permissions) on the disk holding {self.disk}, or choose another output folder, then rerun")


def _file_being_written(err: BaseException, staging: Path) -> str | None:
    """The file under `staging` whose write failed, relative to it, or None. An OSError of open()
    names it; a failed write() or safetensors' writer (Rust) does not, so the failing call's frames
    are asked: the innermost one holding a path under `staging` that is not a folder (diffusers'
    `filepath`, safetensors' `filename`, json's file) was writing it."""
    def under(value: Any) -> str | None:
        if not isinstance(value, (str, os.PathLike)):
            return None
        try:
            relative = os.path.relpath(os.fspath(value), staging)
        except (TypeError, ValueError):  # bytes, or another drive
            return None
        if relative in (os.curdir, os.pardir) or relative.startswith(os.pardir + os.sep):
            return None
        return None if (staging / relative).is_dir() else relative

    candidates = [getattr(error, attr, None) for error in (err, err.__cause__, err.__context__)
                  for attr in ("filename", "filename2")]
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    candidates += [value for frame in reversed(frames) for value in frame.f_locals.values()]
    return next((found for found in map(under, candidates) if found), None)


@contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir` (beside the folder it points to, for a
    symlink: `output_target`); on success it becomes that folder by a rename (an existing one is
    replaced only with `overwrite`, and only when it is empty or a previous export:
    `check_output_folder`), on failure it is deleted. A write that fails for lack of space (or
    any OS error) raises `ExportWriteError` naming the file; the folder is then unchanged."""
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    target = output_target(out)
    existed = target.exists()
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        yield tmp
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = as_os_error(err)
        if cause is None or isinstance(err, ExportWriteError):
            raise
        raise ExportWriteError(out, _file_being_written(err, tmp) if tmp is not None else None, cause,
                               existed) from err
    try:
        # mkdtemp's (and some writers') owner-only modes would hide a shared export from others
        os.chmod(tmp, 0o755)
        for sub, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(Path(sub, name), 0o755)
            for name in files:
                os.chmod(Path(sub, name), 0o644)
        check_output_folder(out, overwrite)  # again: a run may have started there while this export was written
        if target.exists():  # two renames: the old folder is gone only once the new one is in place
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous export back
                raise
            _remove_replaced(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_replaced(old: Path) -> None:
    """Delete the previous export, renamed aside; if any of it cannot be deleted, a warning names
    it (the new export is in place either way)."""
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
        warnings.warn(f"the previous export, renamed to {old} to make room for the new one, could not be deleted "
                      "entirely: delete it yourself", stacklevel=3)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Our own hub-style folder
# --------------------------------------------------------------------------------------


def save_pretrained(source: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = True,
                    overwrite: bool = False, license: str | None = None, release_format: str | None = None) -> Path:
    """Write `out_dir/{model.safetensors, config.json, README.md}`: the weights in the official
    layout, the `DiT` config with what the run recorded (step, autoencoder, and what it was
    trained on: the diffusion chain, or a flow model's `objective`), and a model card.
    `load_pretrained(out_dir)` (or `load_dit_checkpoint` on the weights file) reads it back.

    The weights file records what sampling needs too (its metadata `config`: the `objective` of a
    flow model, else the `diffusion` chain; `step`, `autoencoder`), so `sample.py
    checkpoint=OUT/model.safetensors` samples it as it samples `source` (a SiT release file's
    objective would otherwise be lost with its name). `release_format`: as `load_source`'s."""
    check_output_folder(out_dir, overwrite)  # before the source loads (seconds to minutes)
    model, meta = load_source(source, use_ema, release_format)
    objective = meta.get("objective")
    record = {
        "format": "dit", "model_name": arch_name(model.config.depth, model.config.hidden_size,
                                                 model.config.num_heads, model.config.patch_size),
        "model_config": model.config.to_dict(), "step": meta.get("step"), "weights": meta.get("weights"),
        "autoencoder": meta.get("autoencoder"), "diffusion": None if objective else meta["diffusion"],
        "license": license or meta.get("license"),
    }
    # What sample.py reads from the weights file alone (dit.sampling.trained.trained_objective)
    trained = {"objective": objective} if objective else {"diffusion": meta["diffusion"]}
    if objective:  # only for flow models: a diffusion export's config.json keeps its keys
        record["objective"] = objective
    weights_meta = {"model_name": record["model_name"], "model_config": record["model_config"], "config": trained}
    weights_meta |= {key: record[key] for key in ("step", "autoencoder") if record[key] is not None}
    with staged_folder(out_dir, overwrite) as tmp:
        save_weights_safetensors(model.state_dict(), tmp / WEIGHTS_NAME, weights_meta)
        _write_json(tmp / CONFIG_NAME, record)
        (tmp / CARD_NAME).write_text(model_card(record, kind="dit"), encoding="utf-8")
    return Path(out_dir)


def load_pretrained(folder_or_repo: str | os.PathLike, device: str | torch.device = "cpu",
                    **hub_kwargs: Any) -> tuple[DiT, dict]:
    """(model in eval mode, meta) from a `save_pretrained` folder, or from a hub repo id of one
    (downloaded with huggingface_hub's `snapshot_download(repo_id, **hub_kwargs)`)."""
    folder = Path(folder_or_repo)
    if not folder.is_dir():
        if folder.exists() or str(folder_or_repo).count("/") != 1:
            raise FileNotFoundError(f"{folder} is neither a save_pretrained folder nor a hub repo id (user/name)")
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(folder_or_repo), **hub_kwargs))
    config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME} and {WEIGHTS_NAME}: it is not a folder written by "
                                "dit.io.export.save_pretrained (a diffusers folder loads with load_diffusers_transformer)")
    record = json.loads(config_file.read_text(encoding="utf-8"))
    if record.get("format") != "dit":
        raise ValueError(f"{config_file} is not a dit config (format {record.get('format')!r})")
    fields = {k: v for k, v in record["model_config"].items() if k in CONFIG_FIELDS}
    model, meta = load_dit_checkpoint(weights, device=device, **fields)
    objective = record.get("objective")
    meta.update(step=record.get("step"), autoencoder=record.get("autoencoder"), license=record.get("license"),
                diffusion=record.get("diffusion") or {"noise_schedule": "linear", "diffusion_steps": 1000},
                weights=record.get("weights"), objective=dict(objective) if is_flow(objective) else None)
    return model, meta


# --------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------


def diffusers_config(config: DiTConfig) -> dict:
    """`DiTTransformer2DModel` arguments for a `DiT` of `config`. Raises ValueError for what the
    diffusers model cannot express (an MLP ratio other than 4)."""
    if config.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiTTransformer2DModel has a fixed MLP ratio of 4; this model has "
                         f"{config.mlp_ratio}: it cannot be exported to diffusers (save_pretrained still works)")
    if config.options():  # same shapes for rope / rmsnorm: diffusers would load them and compute something else
        raise ValueError(f"diffusers' DiTTransformer2DModel is the official DiT layout; this model has the architecture "
                         f"options {config.options()}: it cannot be exported to diffusers (save_pretrained still works)")
    return {
        "num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels, "out_channels": config.in_channels * (2 if config.learn_sigma else 1),
        "num_layers": config.depth, "sample_size": config.input_size, "patch_size": config.patch_size,
        # at least 1000 classes: DiTPipeline's null class id is 1000 (to_diffusers_state_dict)
        "num_embeds_ada_norm": max(config.num_classes, PIPELINE_NULL_CLASS), "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # DiT's LayerNorms; diffusers' default 1e-5 would apply to the MLP's norm
    }


def to_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Our (official-layout) tensors under `DiTTransformer2DModel`'s names.

    diffusers keeps a copy of the timestep and label embedders in every block (block 0's serves
    the final layer) and splits the fused qkv projection into q, k, v. Its label table is laid out
    for `DiTPipeline`, whose guidance passes class id 1000 for the unconditional half whatever the
    model: rows 0..K-1 are the model's K classes, row max(K, 1000) its null embedding (the last,
    where diffusers' label dropout also maps), and for K < 1000 the rows K..999 copies of the null
    embedding (ids the model has no class for sample unconditionally; diffusers does not check
    ids). A model trained without label dropout has no null row: the added one (never trained) is
    zeros."""
    sd = dict(state_dict)
    table, classes = sd["y_embedder.embedding_table.weight"], config.num_classes
    null = table[classes:classes + 1] if table.shape[0] > classes else table.new_zeros(1, table.shape[1])
    table = torch.cat([table[:classes], null.expand(max(PIPELINE_NULL_CLASS - classes, 0) + 1, -1)])
    embed = {
        "norm1.emb.timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
        "norm1.emb.timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
        "norm1.emb.timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
        "norm1.emb.timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
        "norm1.emb.class_embedder.embedding_table.weight": table,
    }
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        out.update({theirs + k: v for k, v in embed.items()})
        for part in ("weight", "bias"):
            q, k, v = sd[f"{ours}attn.qkv.{part}"].chunk(3, dim=0)  # qkv rows: all q, then all k, then all v
            out |= {f"{theirs}attn1.to_q.{part}": q, f"{theirs}attn1.to_k.{part}": k,
                    f"{theirs}attn1.to_v.{part}": v}
            out[f"{theirs}attn1.to_out.0.{part}"] = sd[f"{ours}attn.proj.{part}"]
            out[f"{theirs}norm1.linear.{part}"] = sd[f"{ours}adaLN_modulation.1.{part}"]
            out[f"{theirs}ff.net.0.proj.{part}"] = sd[f"{ours}mlp.fc1.{part}"]
            out[f"{theirs}ff.net.2.{part}"] = sd[f"{ours}mlp.fc2.{part}"]
    for part in ("weight", "bias"):
        out[f"proj_out_1.{part}"] = sd[f"final_layer.adaLN_modulation.1.{part}"]
        out[f"proj_out_2.{part}"] = sd[f"final_layer.linear.{part}"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def use_dit_timestep_features(transformer: torch.nn.Module) -> int:
    """Set every timestep projection of a diffusers DiT to DiT's frequencies (shift 0; the
    `[cos, sin]` order already matches). Returns how many were changed; raises if there is none
    (not a `DiTTransformer2DModel`). diffusers' config cannot carry this, so call it after every
    `from_pretrained` (the loaders below do)."""
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

    found = [m for m in transformer.modules() if isinstance(m, CombinedTimestepLabelEmbeddings)]
    if not found:
        raise TypeError(f"{type(transformer).__name__} has no CombinedTimestepLabelEmbeddings: not a diffusers DiT")
    for m in found:
        if not m.time_proj.flip_sin_to_cos:
            raise ValueError("this diffusers DiT computes [sin, cos] timestep features; DiT's are [cos, sin]")
        m.time_proj.downscale_freq_shift = 0
    return len(found)


def to_diffusers(model: DiT):
    """A `DiTTransformer2DModel` (eval mode, DiT's timestep frequencies) computing what `model` does."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(**diffusers_config(model.config))
    transformer.load_state_dict(to_diffusers_state_dict(model.state_dict(), model.config), strict=True)
    use_dit_timestep_features(transformer)
    return transformer.eval()


def _low_cpu_mem_usage() -> bool:
    """diffusers' default for `from_pretrained(low_cpu_mem_usage=...)` when it can honour it: True
    only with accelerate installed. Its default, True, without accelerate prints advice to install
    it on every load (and loads the plain way anyway), so the loaders here pass this instead."""
    from diffusers.utils import is_accelerate_available

    return is_accelerate_available()


def load_diffusers_transformer(folder: str | os.PathLike, **kwargs: Any):
    """`DiTTransformer2DModel.from_pretrained(folder, **kwargs)` with DiT's timestep frequencies.
    `folder` is the model folder (`OUT/transformer`) or the pipeline folder `OUT`."""
    from diffusers import DiTTransformer2DModel

    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "transformer").is_dir():
        kwargs.setdefault("subfolder", "transformer")
    kwargs.setdefault("low_cpu_mem_usage", _low_cpu_mem_usage())
    transformer = DiTTransformer2DModel.from_pretrained(str(folder), **kwargs)
    use_dit_timestep_features(transformer)
    return transformer


def load_diffusers_pipeline(folder: str | os.PathLike, **kwargs: Any):
    """`DiTPipeline.from_pretrained(folder, **kwargs)` with DiT's timestep frequencies. A folder
    exported without a VAE needs `vae=AutoencoderKL.from_pretrained(...)` (its model card says which)."""
    from diffusers import DiTPipeline

    folder = Path(folder)
    if "vae" not in kwargs and not (folder / "vae").is_dir() and (folder / "model_index.json").is_file():
        record = folder / "dit_export.json"
        ae = (json.loads(record.read_text(encoding="utf-8")).get("autoencoder") if record.is_file() else None) or {}
        raise ValueError(f"{folder} was exported without its VAE: pass vae=AutoencoderKL.from_pretrained(...) "
                         f"(this model was trained with {ae.get('name') or 'an autoencoder not recorded'})")
    index = _json_record(folder / "model_index.json")
    if "id2label" not in kwargs and isinstance(index.get("id2label"), dict):  # JSON's keys are strings
        kwargs["id2label"] = {int(k): str(v) for k, v in index["id2label"].items()}
    kwargs.setdefault("low_cpu_mem_usage", _low_cpu_mem_usage())
    pipe = DiTPipeline.from_pretrained(str(folder), **kwargs)
    use_dit_timestep_features(pipe.transformer)
    return pipe


def diffusers_scheduler(diffusion: dict, kind: str = "ddim"):
    """A diffusers scheduler on the training chain's betas (`trained_betas`, float64 from
    `dit.diffusion`), predicting epsilon, never clipping (latents are not in [-1, 1]).

    DDIM's timesteps for N steps of T: "leading" with offset 0 visits k * (T // N), k < N, and
    steps from t to t - T // N. When N divides T that is `sample.py sampler=ddim
    sampler.spacing=ddim` (DiT's "ddimN", 50 of 1000: 980, 960, ..., 0), not the default
    spacing=linspace (999, 979, ..., 0); when it does not (9 of 1000: 888, 777, ..., 0) DiT's
    ddimN takes another stride (112: 896, ..., 0). docs/export.md."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    steps = int(diffusion["diffusion_steps"])
    betas = named_betas(diffusion["noise_schedule"], steps).tolist()
    if kind == "ddim":
        # "leading" spacing with offset 0 visits 0, s, 2s, ... (s = T // N): sampler.spacing=ddim when N divides T.
        return DDIMScheduler(num_train_timesteps=steps, trained_betas=betas, clip_sample=False,
                             set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                             prediction_type="epsilon")
    if kind == "dpm":  # as dit.sampling's dpm++ sampler
        return DPMSolverMultistepScheduler(num_train_timesteps=steps, trained_betas=betas, algorithm_type="dpmsolver++",
                                           solver_order=2, prediction_type="epsilon", lower_order_final=True)
    raise ValueError(f"scheduler must be 'ddim' or 'dpm', got {kind!r}")


def _load_vae(vae: Any):
    if vae is None or not isinstance(vae, (str, os.PathLike)):
        return vae
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(KNOWN_VAES.get(str(vae), str(vae)), low_cpu_mem_usage=_low_cpu_mem_usage())


@contextmanager
def _quiet_logger(name: str, quiet: bool = True) -> Iterator[None]:
    """Only errors from the logger `name` inside the block (when `quiet`): a warning that the
    export expects (no VAE saved: the model card says which to pass) is not a problem to print."""
    logger = logging.getLogger(name)
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_diffusers(source: str | os.PathLike, out_dir: str | os.PathLike, *, use_ema: bool = True,
                     vae: Any = None, scheduler: str = "ddim", id2label: dict | None = None,
                     overwrite: bool = False, license: str | None = None, release_format: str | None = None) -> Path:
    """Write a `DiTPipeline` folder: `transformer/` (safetensors + config.json), `scheduler/`
    (DDIM or DPM-Solver++ on the training chain's betas), `vae/` when `vae` is given (an
    `AutoencoderKL`, a local folder, a hub id or "sd-ema"/"sd-mse"; without it the pipeline is
    loaded with `vae=...`), `model_index.json` (with `id2label` when given) and a model card.

    `DiTTransformer2DModel.from_pretrained(out_dir, subfolder="transformer")` loads it offline;
    `load_diffusers_transformer(out_dir)` also restores DiT's timestep frequencies.

    Guidance works for any class count up to 1000: the transformer's label table puts the model's
    null embedding at the pipeline's null class id 1000 (`to_diffusers_state_dict`).

    Refused before anything is written (`refuse_for_pipeline`, a `DiffusersExportError`): a
    flow-matching model (`load_source`'s `objective`; `release_format` as there: `FlowExportError`),
    a pixel-space model (no autoencoder for the pipeline to decode with), a model of more than 1000
    classes; and an `id2label` naming a class id the model does not have (ValueError)."""
    from diffusers import DiTPipeline

    check_output_folder(out_dir, overwrite)  # before the source loads (seconds to minutes)
    model, meta = load_source(source, use_ema, release_format)
    refuse_for_pipeline(source, meta, model.config)
    id2label = check_id2label(id2label, model.config.num_classes)
    transformer = to_diffusers(model)
    pipe = DiTPipeline(transformer=transformer, vae=_load_vae(vae), scheduler=diffusers_scheduler(meta["diffusion"], scheduler),
                       id2label=id2label)
    record = {
        "model_name": arch_name(model.config.depth, model.config.hidden_size, model.config.num_heads,
                                model.config.patch_size),
        "model_config": model.config.to_dict(), "step": meta.get("step"), "weights": meta.get("weights"),
        "autoencoder": meta.get("autoencoder"), "diffusion": meta["diffusion"], "scheduler": scheduler,
        "license": license or meta.get("license"), "vae_included": pipe.vae is not None,
        "null_class": PIPELINE_NULL_CLASS,
    }
    no_vae_warning = _quiet_logger("diffusers.pipelines.pipeline_utils", pipe.vae is None)  # "self.vae=None ..."
    with staged_folder(out_dir, overwrite) as tmp, no_vae_warning:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if id2label:  # DiTPipeline does not record id2label itself; from_pretrained passes it back
            index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
            _write_json(tmp / "model_index.json", index | {"id2label": {str(k): v for k, v in id2label.items()}})
        _write_json(tmp / "dit_export.json", record)
        (tmp / CARD_NAME).write_text(model_card(record, kind="diffusers"), encoding="utf-8")
    return Path(out_dir)


# --------------------------------------------------------------------------------------
# Model card and upload
# --------------------------------------------------------------------------------------


def model_card(record: dict, kind: str) -> str:
    """README.md for a folder of `kind` "dit" or "diffusers": what it is, config, steps, loading, license."""
    name = record.get("model_name") or "a custom-size DiT"
    licence = record.get("license") or "other"
    ae = record.get("autoencoder") or {}
    ae_name = ae.get("name") or "not recorded (the release used stabilityai/sd-vae-ft-ema or -mse)"
    pixel = ae.get("name") == "pixel"
    denoised = "class-conditional images in pixel space" if pixel else "latents of class-conditional images"
    step = record.get("step")
    flow = record.get("objective")
    if is_flow(flow):
        what, trained = "flow-matching", [
            "A DiT-architecture flow-matching model (SiT, Ma et al. 2024) of class-conditional images: it predicts "
            f"the {flow.get('prediction', 'velocity')} of the {flow.get('path', 'linear')} path at time t in [0, 1]. "
            "It is not a diffusers DiTPipeline (that samples a DDPM noise-prediction chain): sample it with this "
            "repository's `sample.py checkpoint=<this folder>/model.safetensors` (its flow samplers).", "",
            "- objective: `" + json.dumps(flow, sort_keys=True) + "`"]
    else:
        what, trained = "diffusion", [
            f"A DiT (Peebles & Xie, 2023) that denoises {denoised}: epsilon "
            + ("and the learned variance interpolation" if record["model_config"]["learn_sigma"] else "only") + ".", "",
            f"- diffusion chain: {record['diffusion']['noise_schedule']}, {record['diffusion']['diffusion_steps']} steps"]
    lines = ["---", f"license: {licence}", f"library_name: {'diffusers' if kind == 'diffusers' else 'pytorch'}",
             "tags:", "- dit", "- class-conditional", "- image-generation", "---", "",
             f"# {name} (class-conditional {what} transformer)", "", *trained[:-1],
             f"- weights: {record.get('weights') or 'ema'}, training steps: {step if step is not None else 'not recorded'}",
             ("- autoencoder: none (pixel space: the model denoises RGB images in [-1, 1]; sample it with this "
             "repository's `sample.py`)" if pixel else
             f"- autoencoder: {ae_name} (latent scale {ae.get('scale_factor', 0.18215)})"), trained[-1],
             "- config: `" + json.dumps(record["model_config"], sort_keys=True) + "`", "", "## Loading", "", "```python"]
    if kind == "diffusers":
        vae = "" if record.get("vae_included") else ', vae=AutoencoderKL.from_pretrained("<the autoencoder above>")'
        lines += ["from dit.io.export import load_diffusers_pipeline  # sets DiT's timestep frequencies",
                  f"pipe = load_diffusers_pipeline(\"<this folder or repo>\"{vae})",
                  "# plain diffusers: DiTPipeline.from_pretrained(...) loads too, but its timestep features use",
                  "# downscale_freq_shift=1: set pipe.transformer.transformer_blocks[i].norm1.emb.time_proj",
                  "# .downscale_freq_shift = 0 for every block i to get this model's outputs."]
    else:
        lines += ["from dit.io.export import load_pretrained", "model, meta = load_pretrained(\"<this folder or repo>\")"]
    lines += ["```", "", "## License", "",
              f"These weights follow the license of their source ({licence}): the official DiT release is "
              "CC-BY-NC 4.0; weights trained with this code follow the terms of their training data.", ""]
    if kind == "diffusers":
        lines += ["## Differences from this repository's sampler", "",
                  "`DiTPipeline` guides all latent channels (ours: the first 3 by default, as the paper), ignores the "
                  "learned variance (it steps with its scheduler's variance), guides with class id 1000 as its null "
                  "class (the transformer holds this model's null embedding there; the model's classes are ids 0.."
                  f"{record['model_config']['num_classes'] - 1}) and draws one noise tensor per batch from one "
                  "generator. See docs/export.md.", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload DiT weights", api: Any = None) -> Any:
    """Create (if needed) the model repo `repo_id` and upload `folder` with huggingface_hub.
    Returns `upload_folder`'s result. `api` defaults to `huggingface_hub.HfApi(token=token)`."""
    folder = Path(folder)
    if not (folder / CARD_NAME).is_file() or not ((folder / WEIGHTS_NAME).is_file() or (folder / "model_index.json").is_file()):
        raise FileNotFoundError(f"{folder} is not an export folder (no {CARD_NAME} with {WEIGHTS_NAME} or "
                                "model_index.json): write it with `python -m dit.export pretrained|diffusers` first")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id must be 'user/name' or 'org/name', got {repo_id!r}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message)
