"""Issue 21, items 7 and 15: two ways a damaged or planted newest checkpoint got past the resume.

7. A payload that calls `os.system` while it is unpickled, written with the protocol-0 INST opcode
   or with protocol 4 (STACK_GLOBAL), planted as the newest checkpoint of a run directory (as a
   bare pickle, or as the `data.pkl` of a torch zip archive): torch's weights-only loader refuses
   it at an opcode it does not implement ("Unsupported operand 83" / "140"), not at the global it
   names, so the file was taken for a corrupt one, renamed `.corrupt`, and the run resumed from
   the previous checkpoint and exited 0. No code ran, but a planted file must stop the run: now
   it is refused (UnsafeCheckpointError naming the file and what it would call), nothing is
   renamed and nothing trains.
15. A checkpoint whose checksum entry is damaged (its scheme string changed, its digest gone, the
   entry not a mapping) had its verification turned off, so a weight bit flipped in the same file
   resumed silently. Now a checksum entry that is not a valid one of ours is a corrupt file.
"""

import contextlib
import io
import logging
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from dit.io.checkpoint import CheckpointError, UnsafeCheckpointError, load_dit_checkpoint, load_state
from dit.train import run_training
from dit.train.faults import named_tensors
from dit.train.resume import checkpoint_path, list_checkpoints

from conftest import TOY_RUN, run_script, single_thread, toy_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ("ckpt.every=1", "ckpt.keep_last=null")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run directory holding the checkpoints of steps 1 and 2 of the toy run."""
    run = tmp_path_factory.mktemp("two_checkpoints") / "run"
    with single_thread():
        run_training(toy_run_config("max_steps=2", *RUN), run)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# --------------------------------------------------------------------------------------
# 7. Payloads that torch refuses at an opcode, before it sees the global they call
# --------------------------------------------------------------------------------------


def _text(value: str) -> bytes:
    """BINUNICODE: a str of any length."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def inst_payload(command: str) -> bytes:
    """Protocol 0: MARK, the command as a quoted STRING, INST os system (imports os.system and
    calls it on what follows the mark), STOP."""
    return b"(S'" + command.encode() + b"'\nios\nsystem\n."


def stack_global_payload(command: str) -> bytes:
    """Protocol 4: PROTO 4, "os" and "system" as SHORT_BINUNICODE, STACK_GLOBAL (imports
    os.system), the command, TUPLE1, REDUCE (calls it), STOP."""
    return b"\x80\x04\x8c\x02os\x8c\x06system\x93" + _text(command) + b"\x85R."


def prefixed_payload(command: str) -> bytes:
    """The INST payload behind a first opcode torch's loader rejects (a STRING, then POP), so the
    refusal comes at byte 0, as for a file that is no pickle at all."""
    return b"S'x'\n0" + inst_payload(command)


def in_torch_archive(pickled: bytes, like: Path) -> bytes:
    """The torch zip archive `like` with its data.pkl replaced by `pickled`."""
    out = io.BytesIO()
    with zipfile.ZipFile(like) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, pickled if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


PAYLOADS = {"INST": inst_payload, "STACK_GLOBAL": stack_global_payload}


def plant(run: Path, form: str, container: str, marker: Path) -> Path:
    """The payload `form` (creating `marker` when it runs) as checkpoint 3, the newest."""
    pickled = PAYLOADS[form](f"touch {marker}")
    planted = checkpoint_path(run / "checkpoints", 3)
    good = checkpoint_path(run / "checkpoints", 2)
    planted.write_bytes(pickled if container == "bare pickle" else in_torch_archive(pickled, good))
    return planted


def assert_payload_is_live(planted: Path, marker: Path) -> None:
    """An unsafe load runs the payload: what the refusal protected against."""
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):  # os.system returns 0: a bare pickle fails torch's magic-number check
        torch.load(planted, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("container", ["bare pickle", "torch zip archive"])
@pytest.mark.parametrize("form", sorted(PAYLOADS))
def test_an_os_system_payload_torch_refuses_by_opcode_stops_the_resume_and_is_not_set_aside(
        two_checkpoints, tmp_path, form, container, caplog):
    run = copy_of(two_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    planted = plant(run, form, container, marker)

    refused = r"0000003\.pt.*arbitrary Python objects and is refused"
    with (caplog.at_level(logging.WARNING, logger="dit.train"),
          pytest.raises(UnsafeCheckpointError, match=refused) as err):
        run_training(toy_run_config("max_steps=4", *RUN), run)
    message = str(err.value)
    assert "os.system" in message, message  # what it would have called
    assert "weights_only" not in message and "False" not in message  # torch's advice to load it unsafely
    assert not marker.exists()  # no code ran ...
    assert planted.is_file() and not list((run / "checkpoints").glob("*.corrupt"))  # ... nothing was set aside
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2, 3]  # ... and nothing trained past it
    assert not [r for r in caplog.records if "resuming from the previous one" in r.getMessage()]

    with pytest.raises(UnsafeCheckpointError):
        load_dit_checkpoint(planted)  # sampling refuses it the same way
    assert_payload_is_live(planted, marker)


def test_train_py_with_a_planted_inst_payload_exits_nonzero_and_renames_nothing(two_checkpoints, tmp_path):
    run = copy_of(two_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    planted = plant(run, "INST", "torch zip archive", marker)

    proc = run_script("train.py", [*TOY_RUN, "max_steps=4", *RUN, f"hydra.run.dir={run}"], cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"}, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert not marker.exists()
    assert planted.is_file() and not list((run / "checkpoints").glob("*.corrupt"))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2, 3]
    errors = [ln for ln in output.splitlines() if "UnsafeCheckpointError:" in ln]
    assert errors and "0000003.pt" in errors[-1] and "os.system" in errors[-1], output[-3000:]


@pytest.mark.parametrize("container", ["bare pickle", "torch zip archive"])
def test_a_payload_behind_an_opcode_torch_rejects_at_byte_0_is_still_refused_as_unsafe(tmp_path, container):
    # A file torch refuses at its very first byte is usually no pickle at all (text, zeros): a
    # corrupt file. Not when it goes on to import something: that is a payload in disguise.
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    pickled = prefixed_payload(f"touch {marker}")
    path = tmp_path / "evil.pt"
    path.write_bytes(pickled if container == "bare pickle" else in_torch_archive(pickled, good))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*arbitrary Python objects.*os\.system"):
        load_state(path)
    assert not marker.exists()
    pickle.loads(pickled)  # the prefix does not stop a full unpickler: the payload is live
    assert marker.exists()


@pytest.mark.parametrize("content", [b"definitely not a checkpoint\n", b"\x00" * 4096, b"PK\x03\x04 cut short"])
def test_files_that_are_no_pickle_at_all_stay_corrupt_not_hostile(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"junk\.pt.*not a (readable )?PyTorch checkpoint") as err:
        load_state(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


# --------------------------------------------------------------------------------------
# 15. A damaged checksum entry
# --------------------------------------------------------------------------------------


def flip_a_weight_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor record of the torch zip archive `path`
    (stored uncompressed, so its bytes sit in the file as they are)."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_changed_checksum_scheme_does_not_let_a_flipped_weight_bit_resume(two_checkpoints, tmp_path, caplog):
    run = copy_of(two_checkpoints, tmp_path)
    newest, previous = checkpoint_path(run / "checkpoints", 2), checkpoint_path(run / "checkpoints", 1)
    intact = torch.load(newest, weights_only=True)
    data = newest.read_bytes()
    assert data.count(b"sha256-content-v1") == 1
    newest.write_bytes(data.replace(b"sha256-content-v1", b"sha256-content-v7"))  # the same length: a damaged byte
    flip_a_weight_bit(newest)
    damaged = torch.load(newest, weights_only=True)  # still unpickles: only the checksum can tell
    assert damaged["checksum"]["scheme"] == "sha256-content-v7"
    changed = [name for (name, a), (_, b) in zip(named_tensors(intact), named_tensors(damaged))
               if not torch.equal(a, b)]
    assert len(changed) == 1, changed  # one weight changed by one bit, and nothing else can tell

    for load in (load_state, load_dit_checkpoint):
        with pytest.raises(CheckpointError, match=r"0000002\.pt.*checksum entry.*sha256-content-v7") as err:
            load(newest)
        assert not isinstance(err.value, UnsafeCheckpointError)
    with caplog.at_level(logging.WARNING, logger="dit.train"):
        result = run_training(toy_run_config("max_steps=3", *RUN), run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in w and str(previous) in w and "checksum" in w for w in warnings), warnings
    assert newest.with_name("0000002.pt.corrupt").is_file()
    assert result["step"] == 3


@pytest.mark.parametrize("entry", [
    {"scheme": "sha256-content-v2", "sha256": "0" * 64},  # an unknown scheme
    {"scheme": "sha256-content-v1"},  # no digest
    {"scheme": "sha256-content-v1", "sha256": 12345},  # a digest that is not one
    "sha256-content-v1",  # not a mapping
    None,
])
def test_a_checksum_entry_that_is_not_a_valid_one_is_a_corrupt_file(tmp_path, entry):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}, "step": 1, "checksum": entry}, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*checksum entry") as err:
        load_state(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_a_checksum_entry_under_a_damaged_key_is_a_corrupt_file(two_checkpoints, tmp_path):
    # One flipped bit in the key's name ("checksum" -> "checksun") must not turn the check off either.
    path = tmp_path / "0000002.pt"
    data = checkpoint_path(two_checkpoints / "checkpoints", 2).read_bytes()
    assert data.count(b"checksum") == 1
    path.write_bytes(data.replace(b"checksum", b"checksun"))
    flip_a_weight_bit(path)
    assert "checksun" in torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=r"0000002\.pt.*damaged checksum entry.*'checksun'"):
        load_state(path)


def test_files_without_a_checksum_entry_still_load(tmp_path):
    # Release files, weights-only files and our checkpoints from before checksums have none.
    for name, obj in {"release.pt": {"w": torch.ones(3)},
                      "older.pt": {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}, "step": 1}}.items():
        torch.save(obj, tmp_path / name)
        assert load_state(tmp_path / name).keys() == obj.keys()
