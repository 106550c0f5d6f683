"""Flushing to disk before a write counts: files, a folder's entries (a rename), and whole staged trees.

Shared by the registry's durable writes and the engine's staged outputs (models, checkpoints, DICOM series);
only the standard library, so the registry can use it without loading SimpleITK or torch."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk where the platform allows it."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and, where the platform allows, the folders' entries."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))
