"""Loading a checkpoint for sampling, and naming what sampling writes: `load_for_sampling` gives
the model (ours or a release file), its autoencoder and a provenance record naming what it was
trained on; `settings_path_for` and `default_output_name` place a run's outputs and their settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from dit.autoencoder import autoencoder_from_spec, build_autoencoder
from dit.io.checkpoint import (CheckpointError, load_dit_checkpoint, newest_intact_checkpoint,
                               read_safetensors_metadata, run_checkpoints)
from dit.io.release import release_family, strip_wrapper_prefixes
from dit.sampling.images import NonFiniteSamplesError
from dit.sampling.settings import DEFAULT_SPACING, SamplerSettings
from dit.sampling.trained import RELEASE_CHAIN, RELEASE_OBJECTIVES, objective_from_config, trained_chain

__all__ = ["DEFAULT_RELEASE_VAE", "DEFAULT_SAMPLES_DIR", "declared_num_classes", "load_for_sampling", "run_checkpoint",
           "settings_path_for", "default_output_name"]

log = logging.getLogger(__name__)

DEFAULT_RELEASE_VAE = "sd-ema"
# Where sample.py and eval_fid.py write a grid or bulk file when no path is given (relative to the
# working directory): under outputs/, as training's runs, so a checkout stays clean.
DEFAULT_SAMPLES_DIR = Path("outputs") / "samples"
LABEL_TABLE = "y_embedder.embedding_table.weight"


def _check_finite_weights(model: torch.nn.Module, path: Path, which: str) -> None:
    """A checkpoint of a diverged run holds NaN/inf weights, which would sample black images."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteSamplesError(
                f"checkpoint {path}: its {which} weights hold {count} non-finite value(s) (NaN/inf) in {name}: "
                "it comes from a diverged run; sample from an earlier checkpoint (or which=model if only the EMA "
                "is affected)")


def load_for_sampling(checkpoint: str | os.PathLike, *, which: str = "ema", model_name: str | None = None,
                      vae: str | None = None, vae_scale_factor: float | None = None, device="cpu",
                      num_heads: int | None = None, release_format: str | None = None):
    """(model, autoencoder, provenance) from a checkpoint: the model configuration as stored
    (or inferred from release-file shapes), the autoencoder recorded in the checkpoint unless
    `vae` names another (its latent scale: `vae_scale_factor`, else the checkpoint's for its own
    autoencoder, else the VAE's), and a provenance dict for the settings file, which names what
    the model was trained on: the diffusion chain (`provenance["diffusion"]`, from the checkpoint's
    config; the linear 1000-step chain for DiT's release files), or a flow model's objective
    (`provenance["objective"]`: the checkpoint's `config.objective`, or SiT's for a file named like
    SiT's release). `trained_objective(provenance, learn_sigma)` builds either. `num_heads`: for a
    release-format file of a width outside the official table (heads leave no trace in shapes).
    `release_format`: "dit" | "sit", how a release-format file was trained (None: by its name,
    `dit.io.release.release_family`); our checkpoints record their objective and ignore it.
    `checkpoint` may also be a run directory (or its checkpoints/ folder): its newest intact
    checkpoint is loaded (`run_checkpoint`), and `provenance["checkpoint"]` names that file."""
    path = Path(checkpoint).expanduser()
    extra = {"num_heads": num_heads} if num_heads is not None else {}

    def load(file: Path):
        return load_dit_checkpoint(file, which=which, model_name=model_name, device=device, **extra)

    if path.is_dir():
        path, (model, meta) = run_checkpoint(checkpoint, load)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist: give a training checkpoint "
                                "(<run>/checkpoints/NNNNNNN.pt), a run directory (its newest checkpoint) or a "
                                "release file such as DiT-XL-2-256x256.pt")
    else:
        model, meta = load(path)
    _check_finite_weights(model, path, which)
    stored = meta.get("autoencoder") or {}
    name = vae or stored.get("name") or DEFAULT_RELEASE_VAE
    if vae_scale_factor is None and stored.get("name") == name:
        autoencoder = autoencoder_from_spec(stored, device=device)  # the recorded latent transform
    else:
        autoencoder = build_autoencoder(name, scale_factor=vae_scale_factor, device=device)
    if autoencoder.latent_channels != model.config.in_channels:
        raise ValueError(f"vae={name} has {autoencoder.latent_channels} latent channels but the model takes "
                         f"{model.config.in_channels}: pass the autoencoder it was trained with (vae=...)")
    if meta.get("format") == "ours" and meta.get("config") is None:
        log.warning("checkpoint %s records no training config: sampling with the linear %d-step chain (if it was "
                    "trained on another, sample from the training checkpoint, which records it)", path,
                    RELEASE_CHAIN["diffusion_steps"])
    provenance = {"checkpoint": str(path.resolve()), "which": which if meta.get("format") == "ours" else "ema",
                  "step": meta.get("step"), "model_name": meta.get("model_name"), "vae": name}
    objective = (objective_from_config(meta.get("config")) if meta.get("format") == "ours"
                 else RELEASE_OBJECTIVES[release_family(path, release_format)])
    if objective is None:
        provenance["diffusion"] = trained_chain(meta.get("config"))
    else:  # a flow model: its objective, as trained_objective(provenance, ...) rebuilds it
        provenance["objective"] = objective
        if objective.get("kind") == "meanflow":  # and MeanFlow's training options (docs/meanflow.md)
            provenance["meanflow"] = dict((meta.get("config") or {}).get("meanflow") or {})
    return model, autoencoder, provenance


def run_checkpoint(run_dir: str | os.PathLike, read):
    """(path, what `read(path)` returned) of the newest intact checkpoint of a run directory
    (`dit.io.checkpoint.newest_intact_checkpoint`: what resume= and init_from= look in). Newer
    checkpoints that do not read are skipped with a warning naming each, and left where they are
    (a training run may own them). A directory without checkpoints: FileNotFoundError; one
    whose checkpoints all fail to read: CheckpointError listing them."""
    path, value, skipped = newest_intact_checkpoint(run_dir, read)
    if path is None and not skipped:
        raise FileNotFoundError(f"checkpoint={run_dir} is a directory without checkpoints (no <step>.pt in it or in "
                                "its checkpoints/): give a checkpoint file, or a run directory once it has saved one")
    if path is None:
        listed = "; ".join(f"{p.name}: {err}" for p, err in skipped)
        raise CheckpointError(f"checkpoint={run_dir}: none of its checkpoints can be read ({listed}); give a good "
                              "checkpoint file")
    for bad, err in skipped:
        log.warning("checkpoint %s cannot be read (%s); using the previous one, %s", bad, err, path)
    return path, value


def declared_num_classes(checkpoint: str | os.PathLike) -> int | None:
    """The number of classes a checkpoint file says its model has, read without loading its
    weights (torch maps them, reading only the small record; a run directory: its newest file
    that tells),
    so that labels the model does not have are refused in seconds; None where it cannot tell so
    cheaply (then the loaded model's count decides)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():  # the newest checkpoint that tells (all of a run's have the same classes)
        return next((n for n in (declared_num_classes(p) for _, p in reversed(run_checkpoints(path))) if n), None)
    try:
        if path.suffix == ".safetensors":
            config = read_safetensors_metadata(path).get("model_config")
            return int(config["num_classes"]) if isinstance(config, dict) else None
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict):  # ours
            return int(obj["model_config"]["num_classes"])
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # a release file
            table = strip_wrapper_prefixes(obj).get(LABEL_TABLE)
            return None if table is None else table.shape[0] - 1  # the last row is the null class (infer_dit_config)
    except Exception:  # noqa: BLE001 - not readable this way (an older format, damage): loading will say
        return None
    return None


def settings_path_for(out_path: str | os.PathLike) -> Path:
    """Where the sampling settings of an output file live, next to it: `X.json` for a bulk
    `X.npz` (what eval_fid.py reads), `X.png.json` for a grid `X.png` (any other file: its full
    name + `.json`), so a grid and a bulk file of one stem never share a settings file."""
    out_path = Path(out_path)
    return out_path.with_suffix(".json") if out_path.suffix == ".npz" else out_path.with_name(out_path.name + ".json")


def _checkpoint_stem(path: str | os.PathLike) -> str:
    """A checkpoint's file stem, with its run for a run directory's (`<run>-0002000`)."""
    checkpoint = Path(path)
    stem = checkpoint.stem
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.name:
        run = checkpoint.parent.parent.name
        if len(run) > 64:  # a sweep job's directory (its overrides): short, still unique
            run = run[:48] + "-" + hashlib.sha256(run.encode()).hexdigest()[:8]
        stem = f"{run}-{stem}"
    return stem


def _guidance_part(provenance: dict, settings: SamplerSettings) -> str | None:
    """The name's part for a guidance method other than cfg: `autog-<guide>[-step<N>]` (the guide
    checkpoint, `provenance["guide"]`) or `apg-eta<eta>[-r<r>][-mom<beta>]`."""
    if settings.guidance == "autoguidance":
        guide = provenance.get("guide") or {}
        stem = _checkpoint_stem(guide.get("checkpoint", "guide"))
        step = guide.get("step")
        return f"autog-{stem}" + (f"-step{step}" if step is not None and str(step) not in stem else "")
    if settings.guidance == "apg":
        part = f"apg-eta{float(settings.apg_eta):g}"
        if settings.apg_clamp is not None:
            part += f"-r{settings.apg_clamp:g}"
        if settings.apg_momentum:
            part += f"-mom{float(settings.apg_momentum):g}"
        return part
    return None


def default_output_name(provenance: dict, settings: SamplerSettings, *, seed: int,
                        num_samples: int | None = None) -> str:
    """A file stem that states the protocol, e.g. `DiT-XL-2-256x256-ema-ddpm250-cfg1.5-g3-seed0-n50000`
    (`...-cfg2-g3-autog-<guide>-...` with autoguidance, `...-cfg4-g3-apg-eta0-r15-...` with APG).
    A checkpoint of a run directory (`<run>/checkpoints/0002000.pt`) is named with its run
    (`<run>-0002000-...`), so two runs' samples of the same step never share a default file."""
    stem = _checkpoint_stem(provenance["checkpoint"])
    step = provenance.get("step")
    parts = [stem, provenance.get("which", "ema")]
    if step is not None and str(step) not in stem:
        parts.append(f"step{step}")
    # dopri5 picks its own steps: its tolerance names it instead of the unused num_steps
    method = (f"dopri5-rtol{settings.rtol:g}" if settings.sampler == "dopri5"
              else f"{settings.sampler}{settings.num_steps}")
    parts += [method, f"cfg{settings.cfg_scale:g}",
              f"g{settings.guided_channels_value}"]
    guidance = _guidance_part(provenance, settings)
    if guidance is not None:  # autoguidance's guide or APG's knobs; nothing for cfg (names as before)
        parts.append(guidance)
    if settings.spacing != DEFAULT_SPACING:  # DiT's ddimN timesteps rather than both ends
        parts.append(f"{settings.spacing}spacing")
    if settings.precision != "fp32":
        parts.append(settings.precision)
    if settings.clip_denoised is not None and settings.clip_denoised != (provenance.get("vae") == "pixel"):
        parts.append("clip" if settings.clip_denoised else "noclip")  # only when not the automatic choice
    if settings.is_flow and settings.shift != 1:
        parts.append(f"shift{settings.shift:g}")
    if settings.guidance_interval is not None:
        lo, hi = settings.guidance_interval
        parts.append(f"gi{lo:g}-{hi:g}" if settings.is_flow else f"gi{int(lo)}-{int(hi)}")
    parts.append(f"seed{seed}")
    if num_samples is not None:
        parts.append(f"n{num_samples}")
    return "-".join(parts).replace("++", "pp")

