"""Reliability of the files, sampling, metrics and data side (issue 15's attacks): a weights file
swapped while it is being loaded, non-finite sampling, 16-bit images, symlink loops in an
ImageFolder, FID against a reference that does not fit, output paths that collide, concurrent
bulk samplers, atomic writes onto links and devices, and write failures that must name the file.
What each case guarantees: docs/reliability.md.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_random_inception_weights


class _RunsShellOnLoad:
    """What an attacker plants: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------------------
# Case 2: the Inception weights file is checked, then swapped before torch-fidelity reads it
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights.pth")


def test_inception_weights_swapped_after_the_safe_check_never_run_code(tmp_path, inception_weights, monkeypatch):
    """A real swap (os.replace of a payload onto the path) right after the first load of the file
    returns, i.e. between the weights-only check and the moment torch-fidelity would reopen it."""
    from dit import inception as I

    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    path.write_bytes(inception_weights.read_bytes())
    payload = tmp_path / "payload.pth"
    torch.save({"fc.weight": _RunsShellOnLoad(marker)}, payload)
    expected = torch.load(inception_weights, weights_only=True)

    real_load = torch.load
    swapped = []

    def load_then_swap(*args, **kwargs):
        out = real_load(*args, **kwargs)
        if not swapped:  # the attacker wins the race: the file changes after the first load
            os.replace(payload, path)
            swapped.append(True)
        return out

    monkeypatch.setattr(torch, "load", load_then_swap)
    try:
        extractor = I.InceptionFeatures(path, device="cpu", batch_size=2, allow_download=False)
    except Exception as err:  # noqa: BLE001 - first see whether the payload ran
        extractor = err
    monkeypatch.undo()

    assert swapped, "the swap did not happen: the test did not exercise the race"
    assert not marker.exists(), "the swapped-in payload ran"
    assert isinstance(extractor, I.InceptionFeatures), extractor
    state = extractor.net.state_dict()
    assert all(torch.equal(state[k].float(), v.float()) for k, v in expected.items())  # the checked weights
    assert extractor.identity == f"inception-v3-compat:{hashlib.sha256(inception_weights.read_bytes()).hexdigest()[:16]}"

    # The payload is live: a full unpickle of what is now at the path runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()
