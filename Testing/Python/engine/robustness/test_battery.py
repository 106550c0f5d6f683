"""The robustness battery (issue 14): bad inputs across every command, each with the error it must give.

Every row must end with exit status 2, exactly one ``error:`` line naming the problem (for a worker job:
one ``error`` event of kind ``user``), no traceback, nothing changed in the watched folders (the row's
inputs: models, manifests, registries, an existing run) and no file written where the output would go.
Rows run in-process through ``cimis.cli.main`` (and ``cimis.worker.run_job`` for job files); the rows marked
in ``AS_A_PROCESS`` run again as a real ``cimis`` process, where the exit status and stderr are the
process's own. docs/reliability.md describes the battery and its counts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import SimpleITK as sitk
import torch

import cimis
from cimis.cli import main
from cimis.worker import run_job


@dataclass
class Row:
    """One bad input: the command line (or a job file), what to watch, and an optional disk fault."""

    argv: list = field(default_factory=list)
    job: Path | None = None
    watched: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    fault: tuple[Path, int | str] | None = None  # (folder, errno or kit.FULL_UNREPORTED)


Build = Callable[..., Row]
ROWS: dict[str, tuple[Build, tuple[str, ...]]] = {}


def row(name: str, *words: str):
    def register(build: Build) -> Build:
        ROWS[name] = (build, words)
        return build
    return register


# ------------------------------------------------------------------------------------------- helpers
def _model(kit, assets, root, damage=None, name="model") -> Path:
    folder = kit.copy_model(assets, root / "in" / name)
    return damage(folder) if damage else folder


def _card_edit(kit, change):
    return lambda folder: kit.edit_card(folder, change)


def _segment(kit, assets, root, damage) -> Row:
    model = _model(kit, assets, root, lambda f: damage(kit, f))
    image = root / "in" / "ct.nii.gz"
    image.write_bytes((assets / "ct.nii.gz").read_bytes())
    return Row(["segment", "--model", model, "--input", image, "--output", root / "out" / "label.nii.gz",
                "--device", "cpu"], watched=[root / "in"], outputs=[root / "out"])


HUGE_INTEGER = "9" * 5000
DEEP = "[" * 100000 + "]" * 100000


def _with_extra_json(text: str, value: str) -> str:
    return text.replace("{", '{"extra": ' + value + ", ", 1)


def _train_args(manifest: Path, out: Path) -> list:
    return ["train", "--manifest", manifest, "--out", out, "--network", "small", "--spacing", "8",
            "--patch", "32,32,16", "--iterations", "2", "--device", "cpu"]


# ------------------------------------------------------------------------------------ model files (item 9)
SEGMENT_MODELS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "NaN weights": (lambda kit, f: kit.edit_weights(f, lambda t: t.fill_(float("nan"))), ("NaN",)),
    "infinite weights": (lambda kit, f: kit.edit_weights(f, lambda t: t.fill_(float("inf"))), ("infinite",)),
    "int8 weights": (lambda kit, f: kit.edit_weights(f, lambda t: t.to(torch.int8)), ("int8", "floating")),
    "bool weights": (lambda kit, f: kit.edit_weights(f, lambda t: t.bool()), ("bool", "floating")),
    "zero patch size": (lambda kit, f: kit.edit_card(f, lambda c: c["preprocessing"].update(patch_size=[0, 0, 0])),
                        ("preprocessing.patch_size",)),
    "patch size off the network's stride": (
        lambda kit, f: kit.edit_card(f, lambda c: c["preprocessing"].update(patch_size=[30, 32, 16])),
        ("preprocessing.patch_size", "multiple")),
    "patch size of absurd volume": (
        lambda kit, f: kit.edit_card(f, lambda c: c["preprocessing"].update(patch_size=[1024, 1024, 1024])),
        ("preprocessing.patch_size",)),
    "spacing zero": (lambda kit, f: kit.edit_card(f, lambda c: c["preprocessing"].update(spacing=[0, 8, 8])),
                     ("preprocessing.spacing",)),
    "window reversed": (lambda kit, f: kit.edit_card(f, lambda c: c["preprocessing"].update(window=[250, -175])),
                        ("preprocessing.window",)),
    "40 MB class name": (lambda kit, f: kit.edit_card(f, lambda c: c["classes"][0].update(name="x" * (40 << 20))),
                         ("classes[0].name", "41943040")),
    "1001 classes": (lambda kit, f: kit.edit_card(f, lambda c: c.update(
        classes=[{"name": f"c{i}", "value": i + 1} for i in range(1001)])), ("classes", "1001")),
    "class entry not an object": (lambda kit, f: kit.edit_card(f, lambda c: c["classes"].__setitem__(0, 5)),
                                  ("classes[0]", "not a")),
    "class value a string": (lambda kit, f: kit.edit_card(f, lambda c: c["classes"][0].update(value="one")),
                             ("classes[0].value",)),
    "network of 3.4 PB": (lambda kit, f: kit.edit_card(f, lambda c: c["network"].update(filters=[4, 8, 10**9])),
                          ("network.filters",)),
    "network filters a string": (lambda kit, f: kit.edit_card(f, lambda c: c["network"].update(filters="abc")),
                                 ("network.filters",)),
    "network strides of the wrong type": (
        lambda kit, f: kit.edit_card(f, lambda c: c["network"].update(strides={"a": 1})), ("network.strides",)),
    "network of three input channels": (
        lambda kit, f: kit.edit_card(f, lambda c: c["network"].update(in_channels=3)), ("network.in_channels",)),
    "network larger than its weights file": (
        lambda kit, f: kit.edit_card(f, lambda c: c["network"].update(filters=[64, 128, 256])), ("bytes",)),
    "card with a 5000-digit integer": (
        lambda kit, f: kit.set_card_text(f, lambda t: _with_extra_json(t, HUGE_INTEGER)), ("card.json", "4300")),
    "card nested 100000 deep": (lambda kit, f: kit.set_card_text(f, lambda t: _with_extra_json(t, DEEP)),
                                ("card.json", "nested too deeply")),
    "pickle named weights.safetensors": (lambda kit, f: kit.pickle_weights(f), ("pickle",)),
}

for _name, (_damage, _words) in SEGMENT_MODELS.items():
    row(f"segment: model with {_name}", *_words)(
        lambda kit, assets, root, damage=_damage: _segment(kit, assets, root, damage))


@row("learn: base model with NaN weights", "NaN")
def _(kit, assets, root):
    model = _model(kit, assets, root, lambda f: kit.edit_weights(f, lambda t: t.fill_(float("nan"))))
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row(["learn", "--model", model, "--manifest", manifest, "--out", root / "out", "--new-classes",
                "liver", "--iterations", "1", "--device", "cpu"], watched=[root / "in"], outputs=[root / "out"])


@row("evaluate: --classes-from a model whose class entry is not an object", "classes[0]")
def _(kit, assets, root):
    model = _model(kit, assets, root, _card_edit(kit, lambda c: c["classes"].__setitem__(0, "spleen")))
    label = root / "in" / "label.nii.gz"
    label.write_bytes((assets / "label.nii.gz").read_bytes())
    return Row(["evaluate", "--pred", label, "--ref", label, "--classes-from", model, "--out", root / "out"],
               watched=[root / "in"], outputs=[root / "out"])


# ------------------------------------------------------------------------------------------ manifests
def _train_on_manifest(kit, assets, root, change: Callable[[str], str]) -> Row:
    manifest = kit.write_manifest(root / "in" / "data", assets)
    manifest.write_text(change(manifest.read_text()))
    return Row(_train_args(manifest, root / "out"), watched=[root / "in"], outputs=[root / "out"])


@row("train: manifest with a 5000-digit integer", "manifest", "too long")
def _(kit, assets, root):
    return _train_on_manifest(kit, assets, root, lambda t: _with_extra_json(t, HUGE_INTEGER))


@row("train: manifest nested 100000 deep", "manifest", "nested too deeply")
def _(kit, assets, root):
    return _train_on_manifest(kit, assets, root, lambda t: _with_extra_json(t, DEEP))


@row("train: manifest class entry not an object", "class entry")
def _(kit, assets, root):
    def change(text):
        data = json.loads(text)
        data["classes"][0] = 7
        return json.dumps(data)
    return _train_on_manifest(kit, assets, root, change)


# ------------------------------------------------------------------------------------- disks (tracebacks)
@row("train: output folder on a read-only disk", "read-only")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row(_train_args(manifest, root / "out"), watched=[root / "in"], outputs=[root / "out"],
               fault=(root / "out", kit.READ_ONLY))


@row("train: output folder on a full disk", "no space left")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row(_train_args(manifest, root / "out"), watched=[root / "in"], outputs=[root / "out"],
               fault=(root / "out", kit.FULL))


@row("train: --resume from an unreadable checkpoint (the hint names --overwrite)", "unreadable", "--overwrite")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    checkpoint = root / "in" / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"iteration": 1, "optimizer": {"__dict__": 5}}')
    return Row([*_train_args(manifest, root / "in" / "run"), "--resume"], watched=[root / "in"])


@row("models activate: registry on a read-only disk", "read-only")
def _(kit, assets, root):
    registry = kit.registry_with(assets, root / "in" / "registry")
    return Row(["models", "activate", "v0001", "--registry", registry.root], watched=[root / "in"],
               fault=(registry.root, kit.READ_ONLY))


@row("models import: registry on a full disk", "no space left")
def _(kit, assets, root):
    registry = kit.registry_with(assets, root / "in" / "registry")
    model = _model(kit, assets, root, name="other")
    return Row(["models", "import", model, "--registry", registry.root], watched=[root / "in"],
               fault=(registry.staging_dir, kit.FULL))


@row("models import: registry on a read-only disk", "read-only")
def _(kit, assets, root):
    registry = kit.registry_with(assets, root / "in" / "registry")
    model = _model(kit, assets, root, name="other")
    return Row(["models", "import", model, "--registry", registry.root], watched=[root / "in"],
               fault=(registry.root, kit.READ_ONLY))


@row("models export: to a read-only disk", "read-only")
def _(kit, assets, root):
    registry = kit.registry_with(assets, root / "in" / "registry")
    return Row(["models", "export", "v0001", "--out", root / "out" / "m.tar.gz", "--registry", registry.root],
               watched=[root / "in"], outputs=[root / "out"], fault=(root / "out", kit.READ_ONLY))


@row("manifest: --out on a read-only disk", "read-only")
def _(kit, assets, root):
    data = root / "in" / "data"
    kit.write_manifest(data, assets)
    (data / "imagesTr").mkdir()
    (data / "labelsTr").mkdir()
    for sub, name in (("imagesTr", "ct.nii.gz"), ("labelsTr", "label.nii.gz")):
        (data / sub / "case_001.nii.gz").write_bytes((assets / name).read_bytes())
    (data / "dataset.json").write_text(json.dumps({
        "name": "t", "labels": {"0": "background", "1": "spleen"}, "file_ending": ".nii.gz",
        "training": [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}]}))
    return Row(["manifest", data, "--from", "decathlon", "--out", root / "out" / "manifest.json"],
               watched=[root / "in"], outputs=[root / "out"], fault=(root / "out", kit.READ_ONLY))


@row("phantom: --out on a full disk", "no space left")
def _(kit, assets, root):
    return Row(["phantom", "--out", root / "out", "--cases", "1", "--spacing", "8", "--val-cases", "0",
                "--test-cases", "0"], outputs=[root / "out"], fault=(root / "out", kit.FULL))


@row("bench: --out on a read-only disk", "read-only")
def _(kit, assets, root):
    return Row(["bench", "--quick", "--out", root / "out"], outputs=[root / "out"],
               fault=(root / "out", kit.READ_ONLY))


# ----------------------------------------------------------------------------------- registry imports
def _registry(kit, assets, root):
    return kit.registry_with(assets, root / "in" / "registry")


IMPORTS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "a model folder with NaN weights": (
        lambda kit, assets, root: _model(kit, assets, root, lambda f: kit.edit_weights(f, lambda t: t.fill_(float("nan"))), "nan"),
        ("NaN",)),
    "an archive with int8 weights": (
        lambda kit, assets, root: kit.archive_of(
            _model(kit, assets, root, lambda f: kit.edit_weights(f, lambda t: t.to(torch.int8)), "int8"),
            root / "in" / "int8.tar.gz"), ("int8",)),
    "an archive whose card asks for 3.4 PB": (
        lambda kit, assets, root: kit.archive_of(
            _model(kit, assets, root, _card_edit(kit, lambda c: c["network"].update(filters=[320, 320, 10**9])), "big"),
            root / "in" / "big.tar.gz"), ("network.filters",)),
    "an archive whose card is nested 100000 deep": (
        lambda kit, assets, root: kit.archive_of(
            _model(kit, assets, root, lambda f: kit.set_card_text(f, lambda t: _with_extra_json(t, DEEP)), "deep"),
            root / "in" / "deep.tar.gz"), ("nested too deeply",)),
    "a 160 MiB gzip bomb": (
        lambda kit, assets, root: kit.gzip_bomb(assets / "model", root / "in" / "bomb.tar.gz"),
        ("decompression bomb",)),
    "an archive whose weights are larger than its card's network": (
        lambda kit, assets, root: kit.archive_of(assets / "model", root / "in" / "padded.tar.gz", {
            "weights.safetensors": (assets / "model" / "weights.safetensors").read_bytes() + os.urandom(2**21)}),
        ("can need",)),
}

for _name, (_source, _words) in IMPORTS.items():
    def _build(kit, assets, root, source=_source):
        registry = _registry(kit, assets, root)
        return Row(["models", "import", source(kit, assets, root), "--registry", registry.root], watched=[root / "in"])
    row(f"models import: {_name}", *_words)(_build)


@row("models list: registry.json with a 5000-digit integer", "registry file")
def _(kit, assets, root):
    registry = _registry(kit, assets, root)
    marker = registry.root / "registry.json"
    marker.write_text(_with_extra_json(marker.read_text(), HUGE_INTEGER))
    return Row(["models", "list", "--registry", registry.root], watched=[root / "in"])


# --------------------------------------------------------------------------------------- worker jobs
def _segment_job(kit, assets, root, damage) -> Row:
    registry = _registry(kit, assets, root)
    kit.damage_version(registry, "v0001", lambda f: damage(kit, f))
    image = root / "in" / "ct.nii.gz"
    image.write_bytes((assets / "ct.nii.gz").read_bytes())
    job = root / "in" / "job.json"
    job.write_text(json.dumps({"format": "cimis-job/1", "kind": "segment", "id": "seg", "registry": str(registry.root),
                               "output": str(root / "out"), "device": "cpu", "threads": 1,
                               "data": {"images": [str(image)]}}))
    return Row(job=job, watched=[root / "in"], outputs=[root / "out"])


for _name in ("NaN weights", "bool weights", "network of 3.4 PB", "card nested 100000 deep", "zero patch size"):
    _damage, _words = SEGMENT_MODELS[_name]
    row(f"worker segment job: active version with {_name}", *_words)(
        lambda kit, assets, root, damage=_damage: _segment_job(kit, assets, root, damage))


@row("worker segment job: label maps to a disk that fills up unreported", "cannot write", "is the disk full")
def _(kit, assets, root):
    row_ = _segment_job(kit, assets, root, lambda kit, folder: folder)
    # The job's state file stays (it records the failure for the panel); no label map, empty or not, may.
    return Row(job=row_.job, watched=row_.watched, outputs=[root / "out" / "labels"],
               fault=(root / "out", kit.FULL_UNREPORTED))


@row("worker train job: publishing into a registry on a full disk", "no space left")
def _(kit, assets, root):
    registry = _registry(kit, assets, root)
    manifest = kit.write_manifest(root / "data", assets)
    job = root / "data" / "train.json"
    job.write_text(json.dumps({
        "format": "cimis-job/1", "kind": "train", "id": "base", "registry": str(registry.root),
        "output": str(root / "out"), "device": "cpu", "threads": 1,
        "budget": {"iterations": 1, "batch_size": 1, "checkpoint_every": 1, "val_every": 1},
        "data": {"manifest": str(manifest), "classes": ["spleen"]},
        "train": {"network": {"filters": [4, 8, 16], "kernel_sizes": [3, 3, 3], "strides": [1, 2, 2]},
                  "preprocess": {"spacing": [8.0, 8.0, 8.0], "patch_size": [32, 32, 16]}}}))
    # The finished model stays in the job's output folder, so --resume can publish it once there is room.
    return Row(job=job, watched=[root / "in"], fault=(registry.staging_dir, kit.FULL))


# ----------------------------------------------------------------------------- nothing lost (items 1-8)
@row("segment: to a .nii.gz on a disk that fills up unreported", "cannot write", "is the disk full")
def _(kit, assets, root):
    row_ = _segment(kit, assets, root, lambda kit, folder: folder)
    return Row(row_.argv, watched=row_.watched, outputs=row_.outputs, fault=(root / "out", kit.FULL_UNREPORTED))


@row("segment --overwrite: to a .nii.gz on a disk that fills up unreported (the label map there is kept)",
     "cannot write", "is the disk full")
def _(kit, assets, root):
    row_ = _segment(kit, assets, root, lambda kit, folder: folder)
    (root / "out").mkdir()
    (root / "out" / "label.nii.gz").write_bytes((assets / "label.nii.gz").read_bytes())
    return Row([*row_.argv, "--overwrite"], watched=[*row_.watched, root / "out"],
               fault=(root / "out", kit.FULL_UNREPORTED))


def _nonfinite_nifti(assets, target: Path) -> Path:
    """The phantom CT as float32 NIfTI with one NaN and one infinite voxel (ITK's reader turns NaN into 0)."""
    image = sitk.ReadImage(str(assets / "ct.nii.gz"), sitk.sitkFloat32)
    image[1, 2, 3], image[4, 5, 6] = float("nan"), float("inf")
    sitk.WriteImage(image, str(target))
    return target


@row("segment: NIfTI input with NaN and infinite voxels", "1 NaN and 1 infinite")
def _(kit, assets, root):
    row_ = _segment(kit, assets, root, lambda kit, folder: folder)
    _nonfinite_nifti(assets, root / "in" / "ct.nii.gz")
    return row_


@row("train: manifest whose CT has NaN and infinite voxels (NIfTI)", "ct.nii.gz", "1 NaN and 1 infinite")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    _nonfinite_nifti(assets, root / "in" / "data" / "ct.nii.gz")
    return Row(_train_args(manifest, root / "out"), watched=[root / "in"], outputs=[root / "out"])


@row("train: manifest class value above 65535", "65537", "65535")
def _(kit, assets, root):
    def change(text):  # stored as uint16, 65537 would be trained as class 1 (spleen)
        data = json.loads(text)
        data["classes"].append({"name": "large value", "value": 65537})
        return json.dumps(data)
    return _train_on_manifest(kit, assets, root, change)


def _segment_manifest(kit, assets, root, case_id: str) -> Row:
    model = _model(kit, assets, root)
    manifest = root / "in" / "manifest.json"
    manifest.write_text(json.dumps({
        "format": "cimis-manifest/1", "name": "escape", "classes": kit.CLASSES.to_json(),
        "cases": [{"id": case_id, "image": str(assets / "ct.nii.gz")}], "splits": {"test": [case_id]}}))
    # The whole row folder is watched: a prediction written outside --output would change it.
    return Row(["segment", "--model", model, "--manifest", manifest, "--split", "test", "--output",
                root / "out" / "pred", "--device", "cpu"], watched=[root], outputs=[root / "out"])


@row("segment --manifest: case id ../../x", "../../x", "cannot name a file")
def _(kit, assets, root):
    return _segment_manifest(kit, assets, root, "../../x")


@row("segment --manifest: an absolute case id", "elsewhere", "cannot name a file")
def _(kit, assets, root):
    return _segment_manifest(kit, assets, root, str(root / "elsewhere" / "x"))


def _evaluate_args(kit, assets, root, out: Path) -> list:
    label = root / "in" / "label.nii.gz"
    label.write_bytes((assets / "label.nii.gz").read_bytes())
    model = _model(kit, assets, root)
    return ["evaluate", "--pred", label, "--ref", label, "--classes-from", model, "--out", out]


@row("evaluate: --out holding an earlier report, no --overwrite", "already exists", "--overwrite")
def _(kit, assets, root):
    earlier = root / "in" / "eval"
    earlier.mkdir(parents=True)
    for name in ("evaluation.json", "evaluation.md", "evaluation.csv"):
        (earlier / name).write_text(f"an earlier {name}, with the user's notes\n")
    return Row(_evaluate_args(kit, assets, root, earlier), watched=[root / "in"])


@row("evaluate: --out naming a file", "notes.txt", "is a file")
def _(kit, assets, root):
    notes = root / "in" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("a user's notes\n")
    return Row(_evaluate_args(kit, assets, root, notes), watched=[root / "in"])


@row("demo --overwrite: --out a folder that is not a demo's", "does not hold an earlier demo")
def _(kit, assets, root):
    folder = root / "in" / "mine"
    folder.mkdir(parents=True)
    (folder / "scan.nii.gz").write_bytes((assets / "ct.nii.gz").read_bytes())
    return Row(["demo", "--out", folder, "--overwrite", "--device", "cpu"], watched=[root / "in"])


@row("story --overwrite: --out a folder that is not a story's", "does not hold an earlier story")
def _(kit, assets, root):
    totalseg = root / "in" / "totalseg"  # only the file names are checked before --out
    totalseg.mkdir(parents=True)
    (totalseg / "example_ct.nii.gz").write_bytes((assets / "ct.nii.gz").read_bytes())
    (totalseg / "example_seg_total_v2.nii.gz").write_bytes((assets / "label.nii.gz").read_bytes())
    folder = root / "in" / "mine"
    folder.mkdir()
    (folder / "scan.nii.gz").write_bytes((assets / "ct.nii.gz").read_bytes())
    return Row(["story", "--totalseg", totalseg, "--out", folder, "--overwrite", "--device", "cpu"],
               watched=[root / "in"])


# -------------------------------------------------------------- outputs holding a user's files, or files
def _user_folder(root: Path) -> Path:
    folder = root / "in" / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("a user's notes\n")
    return root / "in" / "run"


def _learn_args(kit, assets, root, out: Path, model: Path | None = None) -> list:
    model = model or _model(kit, assets, root)
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return ["learn", "--model", model, "--manifest", manifest, "--out", out, "--new-classes", "liver",
            "--iterations", "1", "--device", "cpu"]


def _user_file(root: Path) -> Path:
    notes = root / "in" / "notes.txt"
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("a user's notes\n")
    return notes


@row("train --overwrite: --out/model a folder that is not a model's", "does not hold an earlier model folder")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row([*_train_args(manifest, _user_folder(root)), "--overwrite"], watched=[root / "in"])


@row("learn --overwrite: --out/model a folder that is not a model's", "does not hold an earlier model folder")
def _(kit, assets, root):
    return Row([*_learn_args(kit, assets, root, _user_folder(root)), "--overwrite"], watched=[root / "in"])


@row("learn --overwrite: --out/model the model the step starts from", "is the model this step starts from")
def _(kit, assets, root):
    model = kit.copy_model(assets, root / "in" / "run" / "model")
    return Row([*_learn_args(kit, assets, root, root / "in" / "run", model), "--overwrite"], watched=[root / "in"])


@row("train: --out naming a file", "notes.txt", "is a file")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row(_train_args(manifest, _user_file(root)), watched=[root / "in"])


@row("learn: --out under a file", "notes.txt", "is a file", "cannot be created")
def _(kit, assets, root):
    return Row(_learn_args(kit, assets, root, _user_file(root) / "run"), watched=[root / "in"])


@row("export: --out under a file", "notes.txt", "is a file")
def _(kit, assets, root):
    model = _model(kit, assets, root)
    return Row(["export", model, "--out", _user_file(root) / "bundle"], watched=[root / "in"])


@row("models export --overwrite: --out an existing folder", "is a folder", "file name")
def _(kit, assets, root):
    registry = kit.registry_with(assets, root / "in" / "registry")
    folder = root / "in" / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's notes\n")
    return Row(["models", "export", "v0001", "--out", folder, "--overwrite", "--registry", registry.root],
               watched=[root / "in"])


@row("models export: --out under a file", "notes.txt", "is a file")
def _(kit, assets, root):
    registry = kit.registry_with(assets, root / "in" / "registry")
    return Row(["models", "export", "v0001", "--out", _user_file(root) / "m.tar.gz", "--registry", registry.root],
               watched=[root / "in"])


@row("phantom: --out under a file", "notes.txt", "is a file")
def _(kit, assets, root):
    return Row(["phantom", "--out", _user_file(root) / "data", "--cases", "1", "--spacing", "8", "--val-cases", "0",
                "--test-cases", "0"], watched=[root / "in"])


@row("train: --workers -1", "--workers")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row([*_train_args(manifest, root / "out"), "--workers", "-1"], watched=[root / "in"], outputs=[root / "out"])


@row("train: --lr nan", "--lr")
def _(kit, assets, root):
    manifest = kit.write_manifest(root / "in" / "data", assets)
    return Row([*_train_args(manifest, root / "out"), "--lr", "nan"], watched=[root / "in"], outputs=[root / "out"])


def _good_segment_job(kit, assets, root, **changes) -> Path:
    registry = _registry(kit, assets, root)
    image = root / "in" / "ct.nii.gz"
    image.write_bytes((assets / "ct.nii.gz").read_bytes())
    job = {"format": "cimis-job/1", "kind": "segment", "id": "seg", "registry": str(registry.root),
           "output": str(root / "out"), "device": "cpu", "threads": 1, "data": {"images": [str(image)]}, **changes}
    path = root / "in" / "job.json"
    path.write_text(json.dumps(job))
    return path


@row("worker job: cancel_file naming the job's own input CT", "cancel_file", "not inside the output folder")
def _(kit, assets, root):
    job = _good_segment_job(kit, assets, root, cancel_file=str(root / "in" / "ct.nii.gz"))
    return Row(job=job, watched=[root / "in"], outputs=[root / "out"])


@row("worker job: cancel_file naming a user's file in the output folder", "cancel_file", "already exists")
def _(kit, assets, root):
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("a user's notes\n")
    job = _good_segment_job(kit, assets, root, cancel_file=str(root / "out" / "notes.txt"))
    return Row(job=job, watched=[root / "in", root / "out"])


@row("worker job: output folder holding a user's tmp folder", "tmp folder that is not the job's")
def _(kit, assets, root):
    (root / "out" / "tmp").mkdir(parents=True)
    (root / "out" / "tmp" / "notes.txt").write_text("a user's notes\n")
    job = _good_segment_job(kit, assets, root)
    return Row(job=job, watched=[root / "in", root / "out"])


@row("worker job: job file with a 5000-digit integer", "job file", "number too long")
def _(kit, assets, root):
    job = _good_segment_job(kit, assets, root)
    job.write_text(_with_extra_json(job.read_text(), HUGE_INTEGER))
    return Row(job=job, watched=[root / "in"], outputs=[root / "out"])


@row("worker job: job file nested 100000 deep", "job file", "nested too deeply")
def _(kit, assets, root):
    job = _good_segment_job(kit, assets, root)
    job.write_text(_with_extra_json(job.read_text(), DEEP))
    return Row(job=job, watched=[root / "in"], outputs=[root / "out"])


# ------------------------------------------------------------------------------------------- running
def _run_in_process(row: Row, kit, capsys) -> tuple[int, str]:
    fault = kit.fault_on(*row.fault) if row.fault is not None else contextlib.nullcontext()
    if row.job is not None:
        events = io.StringIO()
        with fault:
            code = run_job(row.job, out=events)
        lines = [json.loads(line) for line in events.getvalue().splitlines()]
        errors = [e for e in lines if e["event"] == "error"]
        assert all(e["kind"] == "user" for e in errors), errors
        stderr = capsys.readouterr().err
        return code, stderr + "".join(f"error: {e['message']} ({e.get('hint')})\n" for e in errors)
    with fault:
        try:
            code = main([str(a) for a in row.argv])
        except SystemExit as exc:  # a mistake argparse finds: it exits with the status itself
            code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, kit, assets, tmp_path, capsys):
    build, words = ROWS[name]
    row_ = build(kit, assets, tmp_path)
    before = {str(p): kit.snapshot(p) for p in row_.watched}
    code, stderr = _run_in_process(row_, kit, capsys)
    kit.assert_one_error_line(code, stderr, words)
    assert {str(p): kit.snapshot(p) for p in row_.watched} == before, "a watched folder changed"
    for out in row_.outputs:
        assert kit.files_under(out) == [], f"{out} holds files"


AS_A_PROCESS = ["models import: a 160 MiB gzip bomb", "segment: model with pickle named weights.safetensors"]


@pytest.mark.parametrize("name", AS_A_PROCESS)
def test_bad_input_as_a_process(name, kit, assets, tmp_path):
    build, words = ROWS[name]
    row_ = build(kit, assets, tmp_path)
    assert row_.fault is None and row_.job is None
    before = {str(p): kit.snapshot(p) for p in row_.watched}
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(cimis.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "cimis.cli", *map(str, row_.argv)], capture_output=True, text=True,
                          env=env, timeout=120)
    kit.assert_one_error_line(proc.returncode, proc.stderr, words)
    assert {str(p): kit.snapshot(p) for p in row_.watched} == before
