"""Building blocks of the robustness battery: tiny models and the ways they can be damaged, phantom inputs,
registries, disk faults, and the checks every bad input must pass.

Reached through the ``kit`` fixture (this module): test modules are imported by path
(``--import-mode=importlib``) and cannot import a conftest by name.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from cimis.data.classes import ClassSet
from cimis.data.manifest import Case, Manifest
from cimis.data.phantom import generate_phantom
from cimis.data.preprocess import PreprocessConfig
from cimis.model.modelfile import ModelCard, save_model
from cimis.model.network import NetworkConfig, SegmentationNet
from cimis.registry import Registry

TINY_NET = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])
CLASSES = ClassSet.from_names(["spleen", "right kidney", "left kidney"])
PREPROCESS = PreprocessConfig(spacing=[8.0, 8.0, 8.0], patch_size=[32, 32, 16])


@pytest.fixture(scope="session")
def kit():
    return sys.modules[__name__]


# --------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Read-only originals: a phantom CT and label map (8 mm) and a good tiny model. Rows copy what they use."""
    root = tmp_path_factory.mktemp("robustness-assets")
    phantom = generate_phantom(3, "btcv", (8.0, 8.0, 8.0))
    sitk.WriteImage(phantom.image, str(root / "ct.nii.gz"))
    label = sitk.GetArrayFromImage(phantom.label)
    label[label > 3] = 0  # only the three classes of the tiny model
    kept = sitk.GetImageFromArray(label)
    kept.CopyInformation(phantom.label)
    sitk.WriteImage(kept, str(root / "label.nii.gz"))
    torch.manual_seed(0)
    save_model(root / "model", SegmentationNet(TINY_NET, CLASSES.num_channels), ModelCard(CLASSES, TINY_NET, PREPROCESS))
    return root


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_model(assets: Path, target: Path) -> Path:
    shutil.copytree(assets / "model", target)
    return target


def edit_card(folder: Path, change: Callable[[dict], None]) -> Path:
    card = json.loads((folder / "card.json").read_text())
    change(card)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def set_card_text(folder: Path, change: Callable[[str], str]) -> Path:
    (folder / "card.json").write_text(change((folder / "card.json").read_text()))
    return folder


def edit_weights(folder: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    """Rewrite every weight with ``change`` and record the new checksum, as a careless converter would."""
    tensors = {k: change(v) for k, v in load_file(str(folder / "weights.safetensors")).items()}
    save_file(tensors, str(folder / "weights.safetensors"))
    return edit_card(folder, lambda c: c["checksums"].update({"weights.safetensors": sha256_of(folder / "weights.safetensors")}))


def pickle_weights(folder: Path) -> Path:
    """weights.safetensors replaced by a torch.save pickle, its checksum updated to match."""
    torch.save({"w": torch.zeros(3)}, folder / "weights.safetensors")
    return edit_card(folder, lambda c: c["checksums"].update({"weights.safetensors": sha256_of(folder / "weights.safetensors")}))


def write_manifest(folder: Path, assets: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ct.nii.gz", "label.nii.gz"):
        shutil.copy(assets / name, folder / name)
    manifest = Manifest("battery", CLASSES, [Case("a", folder / "ct.nii.gz", folder / "label.nii.gz"),
                                             Case("b", folder / "ct.nii.gz", folder / "label.nii.gz")],
                        {"train": ["a"], "val": [], "test": ["b"]}, folder)
    return manifest.save(folder / "manifest.json", overwrite=True)


def registry_with(assets: Path, root: Path) -> Registry:
    """A registry holding the good model as v0001 (active)."""
    registry = Registry.open(root, create=True)
    registry.publish(assets / "model", {"kind": "train"})
    return registry


def damage_version(registry: Registry, version: str, damage: Callable[[Path], Path]) -> None:
    """Damage a published version in place (as a disk error or a hand edit would), checksums kept consistent."""
    folder = registry.versions_dir / version
    folder.chmod(0o755)
    for item in folder.iterdir():
        item.chmod(0o644)
    damage(folder)


def archive_of(folder: Path, target: Path, replace: dict[str, bytes] | None = None) -> Path:
    """A .tar.gz of a model folder's files, some replaced."""
    with tarfile.open(target, "w:gz") as tar:
        for item in sorted(folder.iterdir()):
            data = (replace or {}).get(item.name, item.read_bytes())
            info = tarfile.TarInfo(item.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


class Zeros(io.RawIOBase):
    """``size`` zero bytes, streamed."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def gzip_bomb(folder: Path, target: Path, size: int = 160 * 2**20) -> Path:
    """A model archive whose weights member is ``size`` zero bytes (a few hundred kB compressed)."""
    with tarfile.open(target, "w:gz") as tar:
        for item in sorted(folder.iterdir()):
            info = tarfile.TarInfo(item.name)
            if item.name == "weights.safetensors":
                info.size = size
                tar.addfile(info, io.BufferedReader(Zeros(size)))
            else:
                info.size = item.stat().st_size
                tar.addfile(info, io.BytesIO(item.read_bytes()))
    return target


# ---------------------------------------------------------------------------------------- disk faults
@contextmanager
def disk_fault(folder: Path, code: int):
    """Every write under ``folder`` fails with ``code`` (ENOSPC: a full disk, EROFS: a read-only one): new
    folders, files opened for writing, renames into it. Reads are untouched. Writes of compiled libraries
    (safetensors) are not seen, but each lands in a staging folder whose creation or rename fails."""
    folder = Path(folder).absolute()
    message = os.strerror(code)

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(folder)
        except (TypeError, ValueError):
            return False

    def fail(path):
        raise OSError(code, message, os.fsdecode(path))

    real = {"open": builtins.open, "os_open": os.open, "mkdir": os.mkdir, "replace": os.replace, "rename": os.rename}

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in str(mode) for c in "wax+") and inside(file):
            fail(file)
        return real["open"](file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            fail(path)
        return real["os_open"](path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            fail(path)
        return real["mkdir"](path, *args, **kwargs)

    def guarded_move(name):
        def move(src, dst, *args, **kwargs):
            if inside(dst) or inside(src):
                fail(dst)
            return real[name](src, dst, *args, **kwargs)
        return move

    patches = [(builtins, "open", guarded_open), (io, "open", guarded_open), (os, "open", guarded_os_open),
               (os, "mkdir", guarded_mkdir), (os, "replace", guarded_move("replace")),
               (os, "rename", guarded_move("rename"))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, replacement in patches:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


FULL, READ_ONLY = errno.ENOSPC, errno.EROFS
FULL_UNREPORTED = "full, unreported"  # a full disk as ITK's image writers meet it (see image_writes_cut_short)


@contextmanager
def image_writes_cut_short(folder: Path):
    """The disk under ``folder`` fills up during every SimpleITK image write, and the writer does not say so:
    ITK's gzip NIfTI writer reports no ``ENOSPC`` and leaves an empty file (issue 14, item 1). Folders and
    the other writes still succeed, as on a disk with a few blocks left."""
    folder = Path(folder).absolute()
    real_write = sitk.WriteImage

    def write_then_lose_everything(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        if Path(os.fsdecode(path)).absolute().is_relative_to(folder):
            with builtins.open(path, "r+b") as fh:
                fh.truncate(0)

    sitk.WriteImage = write_then_lose_everything
    try:
        yield
    finally:
        sitk.WriteImage = real_write


@contextmanager
def fault_on(folder: Path, kind):
    """``disk_fault`` for an errno, ``image_writes_cut_short`` for ``FULL_UNREPORTED``."""
    with image_writes_cut_short(folder) if kind == FULL_UNREPORTED else disk_fault(folder, kind):
        yield


# ---------------------------------------------------------------------------------------------- checks
def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content's SHA-256 ("dir" for folders)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): "dir" if p.is_dir() else sha256_of(p) for p in sorted(root.rglob("*"))}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_one_error_line(code: int, stderr: str, words: tuple[str, ...]) -> str:
    """Exit status 2, no traceback, exactly one ``error:`` line (a progress bar may precede it on the
    terminal line it interrupted) holding every word."""
    assert code == 2, f"exit status {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0][lines[0].index("error: "):]
    for word in words:
        assert word.lower() in line.lower(), line
    return line
