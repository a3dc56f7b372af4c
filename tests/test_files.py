"""Files written whole or not at all, and array files read without surprises."""

import os
import stat

import pytest
import torch

from eenet_fast.errors import FileFormatError
from eenet_fast.files import read_arrays, write_atomic
from eenet_fast.outputs import ExitOutputs


def test_write_atomic_creates_parents_replaces_whole_and_keeps_the_usual_mode(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not a temporary file's 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_atomic(path, "old")

    def interrupted(fd):
        raise KeyboardInterrupt  # killed while the data goes to disk

    monkeypatch.setattr("eenet_fast.files.os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_read_arrays_names_what_a_valid_file_holds(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(FileFormatError, match=r"unknown suffix '\.txt'.*a valid file holds arrays"):
        read_arrays(tmp_path / "x.txt", "a valid file holds arrays")
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        read_arrays(tmp_path, "a valid file holds arrays")


def test_a_damaged_directory_that_hides_a_member_is_refused(tmp_path):
    """A flipped bit in the zip directory made zipfile list two of three members: the costs vanished
    without any CRC failing (found by the fuzz test)."""
    g = torch.Generator().manual_seed(0)
    outputs = ExitOutputs.from_probs(torch.softmax(torch.randn(3, 6, 4, generator=g), -1),
                                     torch.randint(4, (6,), generator=g), [1.0, 2.0, 3.0])
    outputs.save(tmp_path / "valid.npz")
    data = bytearray((tmp_path / "valid.npz").read_bytes())
    data[int(0.91015625 * len(data))] ^= 1
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="does not list every member"):
        ExitOutputs.load(tmp_path / "damaged.npz")
