"""Crash-safe checkpoint folders: files checksummed and fsynced, a manifest written last, an atomic rename.

A checkpoint is written into ``checkpoints/.tmp-<name>``; each file is hashed and fsynced as soon as it
is closed, ``manifest.json`` (CRC-32 and size of every file) is written last, then the folder is renamed
into place and ``checkpoints/latest`` (a one-line file naming it) replaced atomically. A crash at any
moment leaves the previous checkpoint and pointer intact; a folder without a valid manifest is incomplete.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from phasetrain.errors import CheckpointError
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


def verify(path: pathlib.Path) -> None:
    """Check every file against ``manifest.json``; raise CheckpointError naming the first bad one."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {path} has no readable manifest.json (incomplete or corrupted)") from None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != expected["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {file.stat().st_size} bytes, "
                                  f"manifest says {expected['size']} (truncated or corrupted)")
        if crc32(file) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (corrupted)")


def crc32(path: pathlib.Path) -> str:
    # CRC-32 (zip's checksum) finds truncation and corruption at several GB/s; a cryptographic hash
    # would add nothing here, since an unsigned manifest can be rewritten by whoever rewrites a file,
    # and loading never executes code anyway (weights_only / safetensors).
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


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
