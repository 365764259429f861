"""The layout's rules as tests (docs/design.md, "Module map"): imports between the modules of
`dit/` form no circle (module-level and function-local imports both count), `dit/models/dit.py`
imports nothing else of `dit` but its option modules `dit/models/layers.py` (which import nothing of
`dit`), no entry point imports another, and no file points to a design
document outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ENTRY_POINTS = ("train", "sample", "eval_fid")


def package_modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `pkg` (a package's __init__ is the package)."""
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere (top level or inside functions). For
    `from a.b import c` that is `a.b.c` if it is a module, else `a.b`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
                break
    return found


def import_graph(pkg: Path) -> dict[str, set[str]]:
    mods = package_modules(pkg)
    return {m: imported_modules(p, set(mods)) - {m, pkg.name} for m, p in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_library_has_no_import_circle():
    found = circles(import_graph(REPO / "dit"))
    assert not found, "import circles in dit/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_check_finds_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from pkg import a  # dodges the circle at import time\n")
    (pkg / "c.py").write_text("import pkg.a\n")  # imports into the circle, is not part of it
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("def thing():\n    pass\n")
    assert circles(import_graph(pkg)) == []


def test_the_model_file_imports_nothing_else_of_the_library():
    """The model is `dit/models/dit.py` plus its option modules `dit/models/layers.py` (docs/design.md): the
    pair imports nothing else of `dit`, so the two files can be copied out alone."""
    known = set(package_modules(REPO / "dit"))
    assert imported_modules(REPO / "dit" / "models" / "dit.py", known) <= {"dit.models.layers"}
    assert imported_modules(REPO / "dit" / "models" / "layers.py", known) == set()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_imports_another(entry):
    others = set(ENTRY_POINTS) - {entry}
    assert imported_modules(REPO / f"{entry}.py", others) == set()


def test_no_file_points_to_a_design_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.fail("git ls-files listed nothing: run the tests from a clone of the repository")
    outside = ("DESIGN" + ".md", "../" + "shared")  # spelt in pieces, so that this file does not match
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", "") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(ref in text for ref in outside):
            offenders.append(name)
    assert not offenders, f"files referring to documents outside the repository: {offenders}"
    assert (REPO / "docs" / "design.md").is_file()


@pytest.mark.slow
def test_importing_the_config_loads_no_sampler_and_no_metric_backend():
    """dit.config (the schemas every entry point composes first) reads the sampler settings, not
    the samplers: neither the sampler classes nor torch-fidelity load with it."""
    code = ("import sys, dit.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('dit.sampling.', 'torch_fidelity'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert not loaded & {"dit.sampling.diffusion", "dit.sampling.flow", "dit.sampling.samplers",
                         "dit.sampling.images", "dit.sampling.bulk", "dit.sampling.generate"}, loaded
    assert not any(m.startswith("torch_fidelity") for m in loaded), loaded
    assert "dit.sampling.settings" in loaded  # what it does read
