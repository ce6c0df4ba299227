"""Crash-safe state files: a checksummed, versioned envelope written atomically.

A state file is::

    MAGIC (8 bytes) | version (u32, big-endian) | payload length (u64) | sha256(payload) | payload

and the payload is a pickle of a plain dict. Every field is checked on load, so a file that was
truncated by a crash, overwritten with garbage or written by another format version gives a
clear :class:`ValueError` instead of a half-restored object.

Writes are atomic: the bytes go to a temporary file in the same directory, which is flushed,
fsync'ed and renamed over the target (``os.replace`` is atomic on POSIX), and the directory is
fsync'ed so the rename itself survives a power cut. A reader therefore sees either the previous
complete file or the new complete file, never a mixture -- even if the writer is killed with
SIGKILL in the middle of a save.

Only load files you wrote yourself: unpickling runs code from the file.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "state.bin")
>>> write_state(path, {"kind": "demo", "n": 3})
>>> read_state(path, kind="demo")["n"]
3
>>> with open(path, "r+b") as f:
...     _ = f.truncate(60)  # as if the writer had died mid-file (it cannot: see above)
>>> try:
...     read_state(path, kind="demo")
... except ValueError as exc:
...     print(str(exc).split("' ")[1])
is truncated: header says 36 payload bytes, found 8
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any

from rtlm_adapt.unpickling import OlderStateFileError, loads

MAGIC = b"RTLMSTAT"
#: Bumped whenever the layout of the saved dicts changes incompatibly.
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sIQ32s")


def encode_state(state: dict[str, Any]) -> bytes:
    """The file bytes for ``state`` (header + pickle); see the module docstring."""
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), digest) + payload


def decode_state(
    data: bytes, *, source: str = "<bytes>", kind: str | None = None, rebuild: str = ""
) -> dict:
    """Check and unpickle file bytes; raise ValueError naming ``source`` on any defect.

    A file from an older version that names a class this one no longer has raises
    :class:`~rtlm_adapt.unpickling.OlderStateFileError`, with ``rebuild`` (how to make the file
    again) in its message."""
    if len(data) < _HEADER.size:
        raise ValueError(
            f"{source!r} is truncated or not a state file ({len(data)} bytes, "
            f"the header alone is {_HEADER.size})"
        )
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{source!r} is not an rtlm_adapt state file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{source!r} has state format version {version}, this code reads version "
            f"{FORMAT_VERSION}"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise ValueError(
            f"{source!r} is truncated: header says {length} payload bytes, found {len(payload)}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{source!r} is corrupted (checksum mismatch)")
    what = f"a state file of kind {kind!r}" if kind else "a state file"
    try:
        state = loads(payload, source=source, what=what, rebuild=rebuild)
    except OlderStateFileError:
        raise
    except Exception as exc:  # a matching checksum makes this unlikely, but never half-load
        raise ValueError(f"{source!r} holds an unreadable payload: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{source!r} holds a {type(state).__name__}, not a state dict")
    if kind is not None and state.get("kind") != kind:
        raise ValueError(f"{source!r} holds state of kind {state.get('kind')!r}, expected {kind!r}")
    return state


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename)."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        # Never leave a stray temp file behind (the target is untouched at this point).
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # fsync the directory so the rename is durable too (not supported everywhere: best effort).
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomically write ``state`` (a dict) to ``path``."""
    write_bytes_atomic(path, encode_state(state))


def read_state(path: str | os.PathLike[str], *, kind: str | None = None, rebuild: str = "") -> dict:
    """Read a file written by :func:`write_state`; ValueError if it is damaged or foreign
    (``rebuild`` as in :func:`decode_state`)."""
    data = Path(path).read_bytes()
    return decode_state(data, source=str(path), kind=kind, rebuild=rebuild)
