"""`pip install .`: the package metadata lists every package of `dit/` and the hydra configs, the
console scripts name real programs, and an installed copy runs them from another directory (a
fresh venv that borrows this one's dependencies, built offline)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SCRIPTS = {"dit-train": "train", "dit-sample": "sample", "dit-eval": "eval_fid", "dit-cache-latents": "cache_latents"}  # -> job name


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_of_dit_and_the_configs_are_packaged():
    sys.path.insert(0, str(REPO))
    try:
        from setup import dit_packages
    finally:
        sys.path.remove(str(REPO))
    on_disk = [".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dit").rglob("__init__.py")]
    assert dit_packages() == sorted([*on_disk, "dit.conf"])
    assert not [p for p in (REPO / "conf").rglob("*") if p.is_file() and p.suffix != ".yaml"]  # all of conf/ goes
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}


def test_console_scripts_name_the_programs_the_top_level_scripts_run():
    scripts = _pyproject()["project"]["scripts"]
    assert set(scripts) >= set(SCRIPTS)
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    for script in ("train", "sample", "eval_fid"):  # the checkout's scripts call the same run()
        assert f"from dit.cli.{script} import main, run" in (REPO / f"{script}.py").read_text()
    if (REPO / "dit" / "export.py").is_file():
        assert scripts.get("dit-export", "").startswith("dit.cli.export:")


def test_a_checkout_reads_its_own_conf_directory():
    from dit.cli import config_dir

    assert Path(config_dir()) == REPO / "conf"


def _fresh_venv(where: Path) -> Path:
    """A venv with no packages of its own that sees this venv's site-packages through a .pth file
    (so `pip install` finds every dependency installed and downloads nothing)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_pip_install_then_the_console_scripts_run_from_another_directory(tmp_path):
    # Build from a copy: pip writes build/ and *.egg-info into the source tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("dit", "conf", "pyproject.toml", "setup.py", "requirements.txt", "README.md"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    python = _fresh_venv(tmp_path / "venv")
    env = {**os.environ, "PYTHONPATH": "", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-index", str(src)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = python.parent
    commands = {name: [str(bin_dir / name), "--help"] for name in SCRIPTS}
    commands["compose"] = [str(bin_dir / "dit-train"), "experiment=quickstart", "--cfg", "job"]
    commands["where"] = [str(python), "-c", "import dit, dit.cli; print(dit.__file__); print(dit.cli.config_dir())"]
    procs = {k: subprocess.Popen(c, cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in commands.items()}
    out = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{commands[k]}: {stderr[-2000:]}"
        out[k] = stdout

    # The installed copy runs, not the checkout, and its configs are copies of conf/.
    module, conf = (Path(line) for line in out["where"].split())
    assert tmp_path / "venv" in module.parents and conf == module.parent / "conf"
    for path in (REPO / "conf").rglob("*.yaml"):
        assert (conf / path.relative_to(REPO / "conf")).read_bytes() == path.read_bytes(), path
    for name, config in SCRIPTS.items():  # hydra's --help: the program's config groups, from the package
        assert f"{config} is powered by Hydra" in out[name] and "== Configuration groups ==" in out[name], name
    experiments = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))  # the packaged recipes
    assert "quickstart" in experiments and "DiT-XL-2-256" in experiments
    assert f"experiment: {', '.join(experiments)}" in out["dit-train"]
    samplers = sorted(p.stem for p in (REPO / "conf" / "sampler").glob("*.yaml"))
    assert {"ddpm", "ddim", "dpm++", "heun", "sde"} <= set(samplers)
    assert f"sampler: {', '.join(samplers)}" in out["dit-sample"]
    installed = {".".join(p.parent.relative_to(module.parent.parent).parts) for p in module.parent.rglob("__init__.py")}
    assert installed >= {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dit").rglob("__init__.py")}

    # The quickstart composes to what the checkout's conf/ gives.
    from conftest import compose_config
    from omegaconf import OmegaConf

    expected = yaml.safe_load(OmegaConf.to_yaml(compose_config("train", ["experiment=quickstart"])))  # as --cfg prints
    assert yaml.safe_load(out["compose"]) == expected
    quickstart = yaml.safe_load((REPO / "conf" / "experiment" / "quickstart.yaml").read_text())
    assert expected["max_steps"] == quickstart["max_steps"] and expected["model"]["depth"] == quickstart["model"]["depth"]
