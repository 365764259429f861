"""One sampler interface: every built-in sampler is a `Sampler` chosen by name from a
conf/sampler/*.yaml, and a sampler written outside `dit/` (one class plus one YAML file) runs
through exactly the path sample.py takes, bulk file and settings record included."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dit.io.images import to_uint8
from dit.io.checkpoint import load_dit_checkpoint
from dit.sampling.base import Sampler, register_sampler, registered_samplers, sampler_class, unregister_sampler
from dit.sampling.order import initial_noise, sample_generators, sample_labels
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, SamplerMismatchError, SamplerSettings
from dit.sampling.trained import diffusion_from_config
from dit.flow import FlowMatching

from conftest import REPO, run_program, tiny_dit

LEGACY = Path(__file__).resolve().parent / "legacy"


def test_every_builtin_sampler_is_one_class_behind_the_interface_with_its_yaml():
    names = DIFFUSION_SAMPLERS + FLOW_SAMPLERS
    assert len(names) == 7 and set(registered_samplers()) >= set(names)
    for name in names:
        cls = sampler_class(name)
        assert issubclass(cls, Sampler) and cls.name == name
        assert cls.family == ("flow" if name in FLOW_SAMPLERS else "diffusion")
        assert (REPO / "conf" / "sampler" / f"{name}.yaml").is_file()
    assert set(registered_samplers("flow")) >= set(FLOW_SAMPLERS)


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS + FLOW_SAMPLERS)
def test_each_sampler_returns_samples_and_its_network_evaluations(name):
    model = tiny_dit()
    objective = FlowMatching("linear") if name in FLOW_SAMPLERS else diffusion_from_config(None, True)
    sampler = build_sampler(SamplerSettings(sampler=name, num_steps=4, cfg_scale=1.0), objective)
    calls = []

    def denoiser(x, t):
        calls.append(t)
        return model(x, t, torch.zeros(len(x), dtype=torch.long))

    x, nfe = sampler.sample(denoiser, torch.randn(2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 8) and bool(torch.isfinite(x).all())
    assert nfe == len(calls) > 0
    if name not in ("dopri5",):
        assert nfe == {"heun": 8}.get(name, 4)


def test_build_sampler_resolves_auto_and_refuses_the_other_family_once():
    assert build_sampler(SamplerSettings(), diffusion_from_config(None, True)).name == "ddpm"
    assert build_sampler(SamplerSettings(), FlowMatching("linear")).name == "sde"
    with pytest.raises(SamplerMismatchError, match="use sampler=euler\\|heun\\|sde\\|dopri5"):
        build_sampler(SamplerSettings(sampler="ddim"), FlowMatching("linear"))
    with pytest.raises(ValueError, match="not None"):
        build_sampler(SamplerSettings(), None)


class JumpToData(Sampler):
    """A one-step sampler written outside the library: the network's x0 prediction at the noise
    end (t = T - 1), read from its epsilon channels. One network evaluation per sample."""

    name = "jump-to-data"
    family = "diffusion"

    def sample(self, denoiser, noise, *, generator=None, progress=False):
        chain = self.objective
        t = torch.full((len(noise),), chain.num_timesteps - 1, dtype=torch.long)
        eps = denoiser(noise, t)[:, : noise.shape[1]]
        return chain.predict_xstart_from_eps(noise, t, eps), 1


@pytest.fixture
def jump_to_data(tmp_path):
    """The plugin: its class registered and its conf/sampler/jump-to-data.yaml in a config folder
    that hydra searches (`hydra.searchpath`); forgotten afterwards."""
    register_sampler(JumpToData)
    conf = tmp_path / "plugin_conf"
    (conf / "sampler").mkdir(parents=True)
    (conf / "sampler" / "jump-to-data.yaml").write_text("name: jump-to-data\nnum_steps: 1\n")
    yield conf
    unregister_sampler(JumpToData.name)


def test_a_sampler_defined_outside_dit_runs_through_sample_py(jump_to_data, tmp_path, capsys, monkeypatch):
    ckpt, out = LEGACY / "diffusion.pt", tmp_path / "jump.npz"
    code, _, err = run_program("sample.py", [
        f"checkpoint={ckpt}", "which=model", "mode=bulk", "sampler=jump-to-data", "bulk.cfg_scale=1.0",
        "bulk.num_samples=3", "bulk.batch_size=3", "seed=5", f"bulk.out={out}",
        f"hydra.searchpath=[file://{jump_to_data}]"], capsys, monkeypatch)
    assert code == 0, err
    record = (out.with_suffix(".json")).read_text()
    assert '"sampler": "jump-to-data"' in record and '"num_steps": 1' in record

    # The same images by hand: the network's x0 at t = 999 from each sample's own noise and label.
    model, _ = load_dit_checkpoint(ckpt, which="model")
    model.eval()
    idx = np.arange(3)
    labels = sample_labels(5, idx, model.config.num_classes, "uniform")
    noise = initial_noise(sample_generators(5, idx), (3, 16, 16))
    chain = diffusion_from_config(None, True)
    t = torch.full((3,), 999, dtype=torch.long)
    with torch.no_grad():
        x0 = chain.predict_xstart_from_eps(noise, t, model(noise, t, labels)[:, :3])
    got = np.load(out)
    np.testing.assert_array_equal(got["arr_1"], labels.numpy())
    diff = np.abs(got["arr_0"].astype(int) - to_uint8(x0).astype(int))
    assert diff.max() <= 1  # the same arithmetic; one level where another thread count rounds differently


def test_a_plugin_name_is_refused_once_it_is_unregistered(jump_to_data):
    assert build_sampler(SamplerSettings(sampler="jump-to-data", num_steps=1), diffusion_from_config(None, True))
    unregister_sampler("jump-to-data")
    with pytest.raises(ValueError, match="unknown sampler 'jump-to-data'"):
        SamplerSettings(sampler="jump-to-data", num_steps=1).check()
