"""`DiTConfig.time_inputs` (issue 24): the default model (one time input) is the official one,
unchanged; `time_inputs=2` is MeanFlow's network, which embeds t and h = t - r with two sin-cos
embedders summed into the conditioning, and reloads from its checkpoint record."""

import pytest
import torch

from dit.models import DiT, DiTConfig, describe

from conftest import TINY_DIT, tiny_dit


def test_one_time_input_is_the_official_model_and_its_record_is_unchanged():
    model = tiny_dit()
    assert model.config.time_inputs == 1 and model.h_embedder is None
    assert "time_inputs" not in model.config.to_dict() and model.config.options() == {}
    assert not any(k.startswith("h_embedder") for k in model.state_dict())
    # built from the same seed, the weights of a one-input model are what they were before the option
    torch.manual_seed(0)
    a = DiT(**TINY_DIT)
    torch.manual_seed(0)
    b = DiT(**TINY_DIT, time_inputs=1)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_two_time_inputs_sum_the_embeddings_of_t_and_t_minus_r():
    model = tiny_dit(time_inputs=2)
    assert model.config.to_dict()["time_inputs"] == 2 and model.config.options() == {"time_inputs": 2}
    assert "time_inputs=2" in describe(model)
    assert {k for k in model.state_dict() if k.startswith("h_embedder")} == {
        "h_embedder.mlp.0.weight", "h_embedder.mlp.0.bias", "h_embedder.mlp.2.weight", "h_embedder.mlp.2.bias"}
    t, r = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.2, 0.5, 0.0])
    emb = model.embed_time(torch.stack([t, r], dim=1))
    expected = model.t_embedder(t) + model.h_embedder(t - r)
    assert torch.equal(emb, expected)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    out = model(x, torch.stack([t, r], dim=1), y)
    assert out.shape == (3, 8, 8, 8)
    # r matters (h = t - r is an input), and r = t differs from r = 0
    assert not torch.allclose(out, model(x, torch.stack([t, t], dim=1), y))


def test_two_time_inputs_need_a_time_pair_and_the_option_takes_one_or_two():
    model = tiny_dit(time_inputs=2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="time_inputs"):
            DiTConfig(time_inputs=bad)


def test_a_two_time_model_reloads_from_its_record():
    model = tiny_dit(time_inputs=2)
    again = DiT(**model.config.to_dict())
    again.load_state_dict(model.state_dict())  # strict: the h_embedder is rebuilt from the record
    tr = torch.tensor([[0.7, 0.1], [1.0, 0.0]])
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    assert torch.equal(again.eval()(x, tr, y), model(x, tr, y))
