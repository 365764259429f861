"""Only the schema's keys: a key the schema does not have is refused, with or without `+`, and the
refusal names the closest real keys ("did you mean max_steps?").

hydra refuses `max_step=100` (a key that is not in the schema) but advises `+max_step=100`, and
with the `+` it adds the key to the composed config, where nothing reads it: the run goes on with
its default, silently. Every entry point therefore checks its composed config before any work
(`check_known_keys`, called by `dit.cli.errors.reports_errors`), and hydra's own refusal is
rewritten into the same message (`unknown_override`, read by `dit.cli.errors.error_message`).

A node is checked against its dataclass (`OmegaConf.get_type`): TrainConfig and its parts, the
data group's subclass (`data=toy` has no `data.root`: the message names the groups that have
it), SampleConfig, EvalConfig, CacheLatentsConfig. Nodes that are plain dicts (a field of type
`Any` or `dict`) take any key, and so does hydra's own `hydra` node (`hydra.launcher.*`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dit.config.schema import ConfigError

ROOT_OPEN_KEYS = ("hydra",)  # hydra's own node: its keys are hydra's business, not a schema's


def _schema(node: Any) -> Optional[type]:
    """The dataclass a DictConfig node is typed with, or None (a plain dict, None, missing)."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return None
    kind = OmegaConf.get_type(node)
    return kind if dataclasses.is_dataclass(kind) else None


def _field_names(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def _declared(schema: Optional[type], key: str) -> Optional[type]:
    """The dataclass that `schema` declares for its field `key` (Optional unwrapped), if any."""
    if schema is None:
        return None
    try:
        hint = typing.get_type_hints(schema).get(key)
    except Exception:  # an annotation that cannot be evaluated: no declared type
        return None
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _leaves(node: DictConfig, prefix: str) -> list[str]:
    """The dotted keys under `node` (its leaves; a node of a plain dict counts as one key)."""
    out = []
    schema = _schema(node)
    names = _field_names(schema) if schema is not None else None
    for key in node.keys():
        key = str(key)
        if (not prefix and key in ROOT_OPEN_KEYS) or (names is not None and key not in names):
            continue  # hydra's node, or a key someone added: not a key to suggest
        child = node._get_node(key)
        if _schema(child) is not None:
            out += _leaves(child, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _first_leaf(node: Any, path: str) -> str:
    """`path`, or the first key below it when it is a node someone added (`+foo.bar=1`: foo.bar)."""
    while isinstance(node, DictConfig) and not node._is_none() and len(node) > 0:
        key = str(next(iter(node.keys())))
        node, path = node._get_node(key), f"{path}.{key}"
    return path


def _choice(node_path: str, schema: type) -> str:
    """How the command line chooses `schema` for the node at `node_path`: `data=toy` when the
    schema has a `kind` default (the data group's convention), else the dataclass's name."""
    kind = next((f.default for f in dataclasses.fields(schema) if f.name == "kind"), None)
    return f"{node_path}={kind}" if isinstance(kind, str) else schema.__name__


def _subclasses(base: type) -> list[type]:
    out = []
    for sub in base.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def suggestions(key: str, known: list[str], n: int = 3) -> list[str]:
    """The known dotted keys closest to `key`: by the whole key (`max_step` -> max_steps,
    `optim.lrr` -> optim.lr), else by its last part (`lr` -> optim.lr); only those about as
    close as the closest."""
    hits = difflib.get_close_matches(key, known, n=n, cutoff=0.75)
    if hits:
        best = difflib.SequenceMatcher(None, key, hits[0]).ratio()
        return [k for k in hits if difflib.SequenceMatcher(None, key, k).ratio() >= best - 0.05]
    leaf = key.rsplit(".", 1)[-1]
    close_leaves = difflib.get_close_matches(leaf, sorted({k.rsplit(".", 1)[-1] for k in known}), n=n, cutoff=0.8)
    return [k for wanted in close_leaves for k in known if k.rsplit(".", 1)[-1] == wanted][:n]


def describe_unknown(root: DictConfig, key: str) -> str:
    """Why `key` (dotted) is refused and what to write instead, for the composed config `root`.
    The first part of `key` that its node's schema lacks is the unknown one."""
    parts = key.split(".")
    node, schema, declared = root, _schema(root), None
    for i, part in enumerate(parts):
        if schema is None or part not in _field_names(schema):
            break
        declared = _declared(schema, part)
        node = node._get_node(part) if isinstance(node, DictConfig) else None
        schema = _schema(node)
    else:
        i = len(parts)
    where = ".".join(parts[:i])  # the node whose schema lacks parts[i]
    name = parts[i] if i < len(parts) else parts[-1]
    if schema is None:
        owner = where or "the config"
    elif not where:
        owner = schema.__name__
    else:
        choice = _choice(where, schema)
        owner = f"{choice} ({schema.__name__})" if choice != schema.__name__ else f"{where} ({schema.__name__})"
    text = f"unknown config key {key}: {owner} has no key {name!r}, and + cannot add one"
    # A key of another option of the same group (data.root under data=toy): say which.
    if schema is not None and declared is not None:
        others = [sub for sub in (declared, *_subclasses(declared))
                  if sub is not schema and name in _field_names(sub)]
        if others:
            choices = [_choice(where, sub) for sub in others]
            listed = " and ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else choices)
            return f"{text}: {where}.{name} is a key of {listed}; choose {' or '.join(choices)} to set it"
    close = suggestions(key, _leaves(root, ""))
    if close:
        return f"{text}: did you mean {' or '.join(close)}?"
    return f"{text}: --cfg job prints every key"


def unknown_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys of `cfg` that its nodes' schemas do not have (added with `+` or `++`)."""
    out: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        schema = _schema(node)
        names = _field_names(schema) if schema is not None else None
        for key in node.keys():
            key = str(key)
            if not prefix and key in ROOT_OPEN_KEYS:
                continue
            child = node._get_node(key)
            if names is not None and key not in names:
                out.append(_first_leaf(child, f"{prefix}{key}"))
            elif _schema(child) is not None:
                walk(child, f"{prefix}{key}.")

    if _schema(cfg) is not None:
        walk(cfg, "")
    return out


def check_known_keys(cfg: Any) -> None:
    """ConfigError naming every key of the composed config `cfg` that its schema lacks, each with
    the closest real keys; nothing for a config that is not a DictConfig (a dataclass already)."""
    if not isinstance(cfg, DictConfig):
        return
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError("; ".join(describe_unknown(cfg, key) for key in unknown))


_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def unknown_override(err: BaseException) -> Optional[ConfigError]:
    """hydra's refusal of an override whose key is not in a schema ("Could not override 'x'. To
    append to your config use +x=1") as our ConfigError with the closest real keys, or None for
    any other error (and for hydra's own keys, `hydra.*`, where hydra's advice stands)."""
    match = _OVERRIDE.match(str(err))
    cause = err.__cause__
    parent = getattr(cause, "parent_node", None)
    if match is None or not isinstance(parent, DictConfig):
        return None
    key = match.group(1)
    if key.split(".")[0] in ROOT_OPEN_KEYS or not dataclasses.is_dataclass(getattr(cause, "object_type", None)):
        return None
    return ConfigError(describe_unknown(parent._get_root(), key))
