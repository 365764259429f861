"""`python -m dit.export` / `dit-export`: the command line of the export library (dit/io/export.py).

    python -m dit.export diffusers  CKPT OUT [--which model] [--vae DIR_OR_ID] [--scheduler ddim|dpm]
    python -m dit.export pretrained CKPT OUT
    (either: [--release-format dit|sit] for a bare state dict whose name does not say; SiT-*.pt is SiT's)
    python -m dit.export push --folder OUT --repo-id USER/NAME [--private]

`main` returns the exit status (0, or 2 after a one-line error), which `python -m dit.export` and
the console script exit with. A flow-matching model (SiT's release, a run with objective=flow), a
pixel-space model (vae=pixel) and a model of more than 1000 classes are refused by `diffusers` in
one such line; `pretrained` exports them (a flow model with its objective recorded). On success
the one line printed is the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dit.io import export as library
from dit.io.checkpoint import CheckpointError
from dit.io.release import RELEASE_FORMATS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.export", description=library.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, helptext in (("diffusers", "a diffusers DiTPipeline folder"), ("pretrained", "a folder of our format")):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("source", help="release file, our checkpoint, .safetensors or a save_pretrained folder")
        p.add_argument("out", help="output folder (written atomically)")
        p.add_argument("--which", choices=("ema", "model"), default="ema", help="weights of our checkpoints")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output folder that holds a previous export (never a run folder)")
        p.add_argument("--license", default=None, help="license id for the model card (release files: cc-by-nc-4.0)")
        p.add_argument("--release-format", choices=RELEASE_FORMATS, default=None,
                       help="how a release file (a bare state dict) was trained: dit (DDPM) or sit (SiT's flow "
                            "model); default: by its name, SiT-*.pt is SiT's")
        if cmd == "diffusers":
            p.add_argument("--vae", default=None, help="AutoencoderKL to include: sd-ema, sd-mse, hub id or folder")
            p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
            p.add_argument("--id2label", default=None, help="JSON file {class id: name} for pipe.get_label_ids")
    p = sub.add_parser("push", help="upload an export folder to the Hugging Face hub")
    p.add_argument("--folder", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default="Upload DiT weights")
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            library.push_to_hub(args.folder, args.repo_id, private=args.private, commit_message=args.message)
            print(f"uploaded {args.folder} to https://huggingface.co/{args.repo_id}")
        elif args.command == "pretrained":
            print(library.save_pretrained(args.source, args.out, use_ema=args.which == "ema",
                                          overwrite=args.overwrite, license=args.license,
                                          release_format=args.release_format))
        else:
            labels = json.loads(Path(args.id2label).read_text(encoding="utf-8")) if args.id2label else None
            print(library.export_diffusers(args.source, args.out, use_ema=args.which == "ema", vae=args.vae,
                                           scheduler=args.scheduler, id2label=labels, overwrite=args.overwrite,
                                           license=args.license, release_format=args.release_format))
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
