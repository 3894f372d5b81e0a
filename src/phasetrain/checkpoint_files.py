"""Crash-safe checkpoint folders: files checksummed and fsynced, a manifest written last, an atomic rename.

A checkpoint is written into ``checkpoints/.tmp-<name>``; each file is hashed and fsynced as soon as it
is closed, ``manifest.json`` (CRC-32 and size of every file) is written last, then the folder is renamed
into place and ``checkpoints/latest`` (a one-line file naming it) replaced atomically. A crash at any
moment leaves the previous checkpoint and pointer intact; a folder without a valid manifest is incomplete.
A manifest lists every file of its folder: a file it does not list could not be checked, so it makes the
checkpoint corrupt, as does any other difference.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, cast

import torch

from phasetrain.errors import CorruptCheckpoint
from phasetrain.run_folder import atomic_write_text, fsync_path


def seal(folder: pathlib.Path, files: Iterable[pathlib.Path]) -> None:
    """Checksum and fsync each file as ``files`` yields it, then write the manifest.

    Each file is hashed and fsynced on a worker thread as soon as it is closed, while the next one is
    being written (hashlib and file I/O release the GIL): durability costs little more than the writes.
    """
    with ThreadPoolExecutor(max_workers=2) as finisher:
        digests: dict[str, Future[dict[str, Any]]] = {}
        for path in files:
            digests[path.name] = finisher.submit(_digest_and_sync, path)
        _write_manifest(folder, {name: future.result() for name, future in sorted(digests.items())})


def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename the sealed ``tmp`` folder to ``final`` and point ``latest`` at it.

    The same position saved again: the old copy is moved aside first and deleted only once the new one
    is in place, so some intact copy exists at every moment.
    """
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_text(final.parent / "latest", final.name + "\n")


def verify(path: pathlib.Path) -> set[str]:
    """Check the checkpoint folder ``path`` against its ``manifest.json``: every file in it listed, every
    listed file present with the size and CRC-32 written. Returns the names listed; raises
    CorruptCheckpoint naming the first problem."""
    files = _read_manifest(path)
    unlisted = sorted(p.name for p in path.iterdir() if p.name != "manifest.json" and p.name not in files)
    if unlisted:
        raise CorruptCheckpoint(f"checkpoint {path} holds {', '.join(unlisted)}, which manifest.json does not list "
                                "(added after the checkpoint was written, or the manifest was rewritten)")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != expected["size"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is {file.stat().st_size} bytes, "
                                    f"manifest says {expected['size']} (truncated or corrupted)")
        if crc32(file) != expected["crc32"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its checksum (corrupted)")
    return set(files)


def _read_manifest(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` entries, refused unless they have the shape ``_write_manifest`` writes."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        raise CorruptCheckpoint(f"checkpoint {path} has no readable manifest.json (incomplete or corrupted)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_is_entry(name, entry) for name, entry in files.items()):
        raise CorruptCheckpoint(f"checkpoint {path} has a malformed manifest.json: expected "
                                '{"files": {"FILE NAME": {"size": BYTES, "crc32": "8 HEX DIGITS"}, ...}}')
    return files


def _is_entry(name: str, entry: Any) -> bool:
    # A name with a folder in it ("../x") would check a file outside the checkpoint.
    plain_name = name not in ("", ".", "..") and pathlib.PurePath(name).name == name
    return plain_name and isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(
        entry.get("crc32"), str)


def crc32(path: pathlib.Path) -> str:
    # CRC-32 (zip's checksum) finds truncation and corruption at several GB/s; a cryptographic hash
    # would add nothing here, since an unsigned manifest can be rewritten by whoever rewrites a file,
    # and loading never executes code anyway (weights_only / safetensors).
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def torch_save(obj: Any, path: pathlib.Path) -> None:
    """``torch.save(obj, path)``, except that a failed write raises its OSError (ENOSPC, EFBIG, EROFS...).

    Given a path, torch 2.x writes through a C++ stream and reports a full disk as ``RuntimeError: [enforce
    fail at inline_container.cc:672] . unexpected pos 2112 vs 2004``, errno lost. Given a file object it
    calls its ``write()`` and turns the OSError into that same RuntimeError, so the writer keeps it.
    """
    with open(path, "wb") as file:
        writer = _WriteErrorKept(file)
        try:
            torch.save(obj, cast(IO[bytes], writer))  # torch calls only write() and flush()
        except RuntimeError as exc:
            if writer.error is None:
                raise
            raise writer.error from exc


class _WriteErrorKept:
    """A binary file for torch.save that remembers the first OSError its writes raised."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return int(self.file.write(data))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def write_error(exc: BaseException) -> OSError | None:
    """The OSError that made a checkpoint write fail, or None when something else did. safetensors (Rust)
    reports one as ``SafetensorError: Error while serializing: I/O error: ... (os error 28)``."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


def _digest_and_sync(path: pathlib.Path) -> dict[str, Any]:
    """CRC-32 and size of a closed file, after making its contents durable."""
    fsync_path(path)
    return {"crc32": crc32(path), "size": path.stat().st_size}


def _write_manifest(folder: pathlib.Path, files: dict[str, dict[str, Any]]) -> None:
    """Written last: a folder without a valid manifest is an incomplete checkpoint."""
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"files": files}, indent=1))
    fsync_path(manifest)
    fsync_path(folder)
