"""Every documented command composes (issue 23, item 7). Each `python train.py ...`,
`sample.py ...` and `eval_fid.py ...` line of README.md and docs/*.md (code blocks and inline
code, line continuations joined, `torchrun ...` launchers included) is composed as the entry
point would compose it and converted to its schema, so a renamed key, a removed group choice or a
wrong type in the docs fails here instead of in a reader's terminal. Placeholders the docs use
for the reader's own values (`...`, `DIR`, `$VAR`, `[overrides]`) are replaced by a dummy value;
a sweep (`-m`) composes each of its jobs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"train.py": "train", "sample.py": "sample", "eval_fid.py": "eval"}
# A command that needs something beyond the checkout (a plugin's config folder on hydra's
# search path) and where the doc says so: doc file -> the command's distinctive argument.
NEEDS_A_PLUGIN = {"sampling.md": "sampler=jump-to-data"}
_COMMAND = re.compile(r"(?:python[0-9.]*|torchrun(?: --?[\w-]+(?:=\S+)?)*) +(train|sample|eval_fid)\.py\b([^`\n]*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, program, arguments) of every documented command."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join shell line continuations
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in _COMMAND.finditer(line):
                rest = m.group(2).split("#", 1)[0]  # a shell comment ends the command
                rest = rest.split(";", 1)[0]
                try:
                    args = shlex.split(rest)
                except ValueError:
                    args = rest.split()
                found.append((f"{doc.name}:{lineno}", m.group(1) + ".py", args))
    return found


def _placeholder(arg: str) -> str | None:
    """The argument with the reader's own values replaced, or None to drop it."""
    if arg in ("...", "[overrides]", "…") or arg.startswith("[") and not "=" in arg:
        return None
    key, eq, value = arg.partition("=")
    if not eq:
        return arg
    if value in ("...", "…", "DIR", "C", "CKPT", "PATH") or value.startswith("$") or "$" in value:
        value = "placeholder"
    return f"{key}={value}"


def _jobs(args: list[str]) -> list[list[str]]:
    """The override lists the command runs: one, or a sweep's jobs (`-m`)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in args)
    args = [a for i, a in enumerate(args) if not (i and args[i - 1] in ("--cfg", "-c", "--package", "-p"))]
    overrides = [a for a in (_placeholder(a) for a in args) if a and not a.startswith("-")]
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch][:4]


COMMANDS = documented_commands()


def test_the_docs_document_every_program():
    assert {program for _, program, _ in COMMANDS} == set(PROGRAMS)
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where,program,args", COMMANDS, ids=[f"{w} {p}" for w, p, _ in COMMANDS])
def test_each_documented_command_composes(where, program, args):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from dit.config import to_eval_config, to_sample_config, to_train_config
    from dit.config.keys import check_known_keys

    for doc, arg in NEEDS_A_PLUGIN.items():
        if where.startswith(doc) and arg in args:  # the doc must show the plugin's config file
            assert f"{arg.split('=')[1]}.yaml" in (ROOT / "docs" / doc).read_text()
            args = [a for a in args if a != arg]
    name = PROGRAMS[program]
    partial = any(a in ("...", "…", "[overrides]") for a in args)  # "the rest of your command"
    for job in _jobs(args):
        if partial and name == "train" and not any(a.startswith("data.root=") for a in job):
            job.append("data.root=placeholder")
        job = [a for a in job if not a.startswith(("hydra/", "hydra."))]  # launcher keys: hydra's own
        if name == "sample" and not any(a.startswith("checkpoint=") for a in job):
            job.append("checkpoint=placeholder.pt")
        if name == "eval" and not any(a.startswith("reference=") for a in job):
            job.append("reference=placeholder.npz")
        cfg = compose_config(name, job, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the defaults (run names)
        with open_dict(cfg):
            del cfg["hydra"]
        check_known_keys(cfg)  # what every entry point checks before it runs (dit/config/keys.py)
        {"train": to_train_config, "sample": to_sample_config, "eval": to_eval_config}[name](cfg)
