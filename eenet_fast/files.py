"""Files in and out: reading array files that may hold anything, writing files whole or not at all.

* :func:`read_arrays` reads a ``.npz`` or a torch file (``.pt``/``.pth``) without running pickle
  and turns every way it can fail (not a zip, truncated, a member failing its CRC check, pickled
  objects, another object than a tensor or a dict of them) into a
  :class:`~eenet_fast.errors.FileFormatError` naming the file and what a valid one holds. The CRC
  of every member of a zip is checked first: ``torch.load`` does not, so a flipped byte in a
  tensor would otherwise load as another number.
* :func:`write_atomic` writes to a temporary name in the target's folder and renames it into place,
  so a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import secrets
import struct
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eenet_fast.errors import FileFormatError

__all__ = ["read_arrays", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole: into a hidden temporary file in the same
    folder (created with its parents), flushed to disk, then renamed over ``path``. If anything
    fails, ``path`` is as it was and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        with open(partial, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with suppress(OSError):
            partial.unlink()
        raise


def _refuse(path: Path, problem: str, valid: str, error: BaseException | None = None) -> FileFormatError:
    """The error for an unreadable ``path``: the problem, the parser's first line, what a valid file holds."""
    detail = ""
    if error is not None:
        lines = str(error).strip().splitlines()
        detail = f" ({type(error).__name__}: {lines[0] if lines else 'no message'})"
    return FileFormatError(f"{path} {problem}{detail}; {valid}")


def _check_zip(path: Path, valid: str) -> None:
    """Raise unless ``path`` is a zip archive whose members all pass their CRC check and whose
    directory lists every member (the members tile the archive up to the directory)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            complete = _members_tile(archive, path)
    except Exception as error:  # any failure of the parser means a broken file: zipfile, zlib, struct, OSError...
        raise _refuse(path, "is not a readable zip archive: it is truncated, corrupted or of another format", valid, error) from None
    if bad is not None:
        raise _refuse(path, f"is corrupted: its member {bad!r} fails its CRC check", valid)
    if not complete:
        raise _refuse(path, "is corrupted: its directory does not list every member of the archive", valid)


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature, versions, flags, method, time, date, crc, sizes, name and extra lengths


def _members_tile(archive: zipfile.ZipFile, path: Path) -> bool:
    """Whether the members the directory lists follow one another from the start of the file to the
    directory (a damaged directory entry can hide the members after it from ``zipfile``: no CRC
    covers the directory)."""
    end = 0
    with open(path, "rb") as f:
        for info in sorted(archive.infolist(), key=lambda i: i.header_offset):
            if info.header_offset != end:
                return False
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            end = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10] + info.compress_size
            if fields[2] & 0x08:  # a data descriptor follows the data: its signature is optional
                f.seek(end)
                end += 16 if f.read(4) == b"PK\x07\x08" else 12
    return end == archive.start_dir


def read_arrays(path: str | Path, valid: str) -> dict[str, Any]:
    """The named arrays of the ``.npz`` or torch file ``path``.

    Args:
        valid: what a valid file holds, for the error messages.

    Returns:
        ``{name: numpy array or tensor}``; a torch file holding a bare tensor gives ``{"probs": tensor}``
        (the authors' format of softmax outputs).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        FileFormatError: the file cannot be read, is corrupted, or holds something else than named arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".pt", ".pth"):
        raise _refuse(path, f"has an unknown suffix {path.suffix!r}: use .npz or .pt", valid)
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch's format since 1.6; older torch files are plain pickles
    if suffix == ".npz" or zipped:
        _check_zip(path, valid)
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                obj: Any = {key: archive[key] for key in archive.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # numpy, zipfile and pickle raise a dozen kinds; each means a broken file
        raise _refuse(path, "cannot be read", valid, error) from None
    if isinstance(obj, torch.Tensor):
        return {"probs": obj}
    if not isinstance(obj, dict):
        raise _refuse(path, f"holds a {type(obj).__name__}, not arrays by name", valid)
    wrong = [key for key in obj if not isinstance(key, str)]
    if wrong:
        raise _refuse(path, f"holds a dict with keys that are not names ({wrong[0]!r})", valid)
    return obj
