"""The registry folder: immutable versions, the active-version pointer, and publishing, importing, activating,
deleting and exporting versions (the layout and guarantees are in :mod:`cimis.registry`)."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cimis import __version__
from cimis.errors import CimisError
from cimis.fsync import fsync_dir
from cimis.registry.archive import check_import_source, extract_members
from cimis.registry.durable_files import copy_synced, remove_tree, write_json_atomic, write_synced
from cimis.registry.file_lock import exclusive_lock
from cimis.registry.model_folder import (
    CARD,
    PROTOTYPES,
    SUMMARY,
    VERSION_FILES,
    WEIGHTS,
    full_load_check,
    read_json_file,
    verify_model_folder,
)
from cimis.registry.staging import is_stale, staging_name

REGISTRY_FORMAT = "cimis-registry/1"
ACTIVE_FORMAT = "cimis-active/1"
SUMMARY_FORMAT = "cimis-version/1"

_VERSION_NAME = re.compile(r"v(\d{4,9})")

StepHook = Callable[[str], None]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class VersionInfo:
    """What ``cimis models list`` shows about one version."""

    name: str
    path: Path
    active: bool
    created: str
    kind: str
    classes: list[str]
    note: str
    summary: dict

    def to_json(self) -> dict:
        return {"version": self.name, "path": str(self.path), "active": self.active, "created": self.created,
                "kind": self.kind, "classes": self.classes, "note": self.note, "summary": self.summary}


class Registry:
    """A model registry folder (its layout and guarantees: :mod:`cimis.registry`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    # -------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: str | Path, create: bool = False) -> "Registry":
        """The registry at ``root``; with ``create``, a missing or empty folder becomes a new registry."""
        reg = cls(root)
        marker = reg.root / "registry.json"
        if marker.is_file():
            meta = read_json_file(marker, "registry file")
            if meta.get("format") != REGISTRY_FORMAT:
                raise CimisError(f"{reg.root} is not a CIMISLearner model registry (format {meta.get('format')!r})")
            return reg
        if not create:
            raise CimisError(f"there is no model registry at {reg.root}",
                             "train a first model with a train job, or create one with `cimis models import`")
        if reg.root.exists() and (not reg.root.is_dir() or any(reg.root.iterdir())):
            raise CimisError(f"{reg.root} exists and is not a model registry", "choose an empty or new folder")
        for sub in ("versions", "staging", "trash"):
            (reg.root / sub).mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"format": REGISTRY_FORMAT, "created": now_iso(), "last_version": 0})
        return reg

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    # -------------------------------------------------------------------------------------- queries
    def version_names(self) -> list[str]:
        """Published versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir() if _VERSION_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(names, key=_version_number)

    def active_version(self) -> str | None:
        """The active version's name, or None before the first version is activated."""
        path = self.root / "active.json"
        if not path.exists():
            return None
        data = read_json_file(path, "the active-version pointer",
                              "choose the version to use with `cimis models activate VERSION`")
        name = data.get("version")
        if not isinstance(name, str) or not _VERSION_NAME.fullmatch(name):
            raise CimisError(f"{path} names no valid version", "choose one with `cimis models activate VERSION`")
        return name

    def resolve(self, version: str | None = None) -> str:
        """``version`` checked to exist, or the active version when None."""
        if version is None or version == "active":
            name = self.active_version()
            if name is None:
                raise CimisError(f"the registry {self.root} has no active model", "train a first model, or activate a version")
        else:
            name = _normalise_version(version)
        if not (self.versions_dir / name).is_dir():
            known = ", ".join(self.version_names()) or "none"
            raise CimisError(f"the registry {self.root} has no version {name}", f"known versions: {known}")
        return name

    def path(self, version: str | None = None) -> Path:
        return self.versions_dir / self.resolve(version)

    def summary(self, version: str) -> dict:
        path = self.versions_dir / _normalise_version(version) / SUMMARY
        if not path.exists():
            return {}
        return read_json_file(path, f"version {version}: the summary")

    def card(self, version: str | None = None) -> dict:
        """The version's model card as JSON (cheap: no tensors are read)."""
        name = self.resolve(version)
        return read_json_file(self.versions_dir / name / CARD, f"version {name}: the model card",
                              "the version is damaged; activate another one")

    def info(self, version: str) -> VersionInfo:
        name = self.resolve(version)
        card = self.card(name)
        summary = self.summary(name)
        classes = [c.get("name", "?") for c in card.get("classes", []) if isinstance(c, dict)]
        return VersionInfo(name, self.versions_dir / name, name == self.active_version(),
                           str(summary.get("created", card.get("created", ""))), str(summary.get("kind", "")),
                           classes, str(summary.get("note", "")), summary)

    def list(self) -> list[VersionInfo]:
        return [self.info(name) for name in self.version_names()]

    def verify(self, version: str | None = None) -> dict:
        """Cheap integrity check of a version (file names, safetensors headers, checksums); returns its card."""
        name = self.resolve(version)
        return verify_model_folder(self.versions_dir / name, f"model version {name} in {self.root}")

    def load(self, version: str | None = None, device: str = "cpu"):
        """``(net, card, prototypes)`` of a version, fully checked. Imports torch and MONAI."""
        from cimis.model.modelfile import load_model, load_prototypes

        name = self.resolve(version)
        self.verify(name)
        folder = self.versions_dir / name
        net, card = load_model(folder, device)
        return net, card, load_prototypes(folder, card)

    def find_by_job_token(self, token: str) -> str | None:
        """The version a job published (its summary holds the job's token), if any: lets a resumed job
        that was killed after publishing finish without publishing twice."""
        for name in self.version_names():
            try:
                if self.summary(name).get("job", {}).get("token") == token:
                    return name
            except CimisError:
                continue
        return None

    # ------------------------------------------------------------------------------------- changing
    def publish(self, model_dir: Path, summary: dict, activate: bool = True, on_step: StepHook | None = None) -> str:
        """Copy a finished model folder into a new version (and make it active); returns the version name.

        ``on_step`` is called with ``"partial"`` (some files staged), ``"staged"`` (staging complete and
        checked), ``"published"`` (renamed into versions/) and ``"activated"``.
        """
        card = verify_model_folder(Path(model_dir), f"the model to publish ({model_dir})")
        hook = on_step or (lambda step: None)
        with self._staging() as stage:
            first = True
            for name in (CARD, WEIGHTS, PROTOTYPES):
                source = Path(model_dir) / name
                if source.is_file():
                    copy_synced(source, stage / name)
                    if first:
                        hook("partial")
                        first = False
            write_synced(stage / SUMMARY, _summary_json(summary, card))
            self._seal(stage)
            hook("staged")
            return self._commit(stage, activate, hook)

    def import_model(self, source: str | Path, activate: bool = False, on_step: StepHook | None = None) -> str:
        """Add a version from an exported archive (.tar.gz) or a model folder; returns its name.

        Archive members are checked before anything is extracted: regular files only, no absolute paths, no
        ``..``, no links, only the files of a model version (at most one top-level folder), sane sizes.
        The staged copy is then fully loaded (checksums, safetensors, network shapes) before it appears.
        """
        source = Path(source)
        hook = on_step or (lambda step: None)
        members = check_import_source(source)
        with self._staging() as stage:
            if members is None:
                for name in VERSION_FILES:
                    if (source / name).is_file():
                        copy_synced(source / name, stage / name)
            else:
                extract_members(source, members, stage)
            hook("partial")
            card = verify_model_folder(stage, f"the imported model {source.name}")
            full_load_check(stage, f"the imported model {source.name}")
            original = {}
            if (stage / SUMMARY).is_file():
                original = read_json_file(stage / SUMMARY, f"the imported model {source.name}: summary.json")
            summary = {**original, "imported": {"from": source.name, "at": now_iso(), "previous_summary": bool(original)}}
            summary.setdefault("kind", "import")
            (stage / SUMMARY).unlink(missing_ok=True)
            write_synced(stage / SUMMARY, _summary_json(summary, card))
            self._seal(stage)
            hook("staged")
            return self._commit(stage, activate, hook)

    def activate(self, version: str) -> str:
        """Make ``version`` the active one (also the rollback command); returns its name."""
        with self._lock():
            name = self.resolve(version)
            self.verify(name)
            self._write_active(name)
        return name

    def delete(self, version: str) -> str:
        """Remove a version that is not active; returns its name."""
        with self._lock():
            name = self.resolve(version)
            if name == self.active_version():
                raise CimisError(f"{name} is the active version and cannot be deleted",
                                 "activate another version first (cimis models activate)")
            self._remember_last(max(_version_number(n) for n in self.version_names()))
            self.trash_dir.mkdir(exist_ok=True)
            target = self.trash_dir / f"{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
            # Moving a folder to another parent rewrites its '..' entry, which needs write permission on it.
            (self.versions_dir / name).chmod(0o755)
            os.rename(self.versions_dir / name, target)  # the version disappears in one step
            fsync_dir(self.versions_dir)
        remove_tree(target)
        return name

    def export(self, version: str | None, archive: str | Path, overwrite: bool = False) -> Path:
        """Write one version as a .tar.gz (flat: card.json, *.safetensors, summary.json); returns the path."""
        from cimis.data.io import check_folder_output  # SimpleITK stays unloaded for the registry's other uses

        name = self.resolve(version)
        self.verify(name)
        archive = Path(archive).absolute()
        if archive.is_dir():
            raise CimisError(f"{archive} is a folder", "give a file name for the archive, e.g. model.tar.gz")
        check_folder_output(archive.parent, "archive")
        if archive.exists() and not overwrite:
            raise CimisError(f"{archive} already exists", "choose another file name")
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(f".{archive.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with tarfile.open(partial, "w:gz") as tar:
                for member in VERSION_FILES:
                    path = self.versions_dir / name / member
                    if path.is_file():
                        info = tarfile.TarInfo(member)
                        info.size, info.mode, info.mtime = path.stat().st_size, 0o644, int(path.stat().st_mtime)
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
            os.replace(partial, archive)
        finally:
            partial.unlink(missing_ok=True)
        return archive

    def sweep(self) -> None:
        """Remove leftovers of killed writers: staging folders whose writer is known dead (or a day old) and
        trash. Under the registry lock, so it never races a writer's commit or another sweep."""
        with self._lock():
            for folder in (self.staging_dir, self.trash_dir):
                if not folder.is_dir():
                    continue
                for item in folder.iterdir():
                    if folder == self.trash_dir or is_stale(item):
                        remove_tree(item)

    # ------------------------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        """A fresh folder under staging/ named after this process; removed unless committed."""
        if not (self.root / "registry.json").is_file():
            raise CimisError(f"there is no model registry at {self.root}")
        self.sweep()
        self.staging_dir.mkdir(exist_ok=True)
        stage = self.staging_dir / staging_name(os.getpid())
        stage.mkdir()
        try:
            yield stage
        finally:
            if stage.exists():
                remove_tree(stage)

    def _seal(self, stage: Path) -> None:
        """Check the staged version, make its files read-only and flush it to disk."""
        verify_model_folder(stage, "the staged version")
        for item in stage.iterdir():
            item.chmod(0o444)
        fsync_dir(stage)

    def _commit(self, stage: Path, activate: bool, hook: StepHook) -> str:
        self.versions_dir.mkdir(exist_ok=True)
        with self._lock():
            number = max([self._last_number()] + [_version_number(n) for n in self.version_names()]) + 1
            while True:
                name = f"v{number:04d}"
                try:
                    os.rename(stage, self.versions_dir / name)  # fails if the name exists and is not empty
                    break
                except OSError:
                    if not (self.versions_dir / name).exists():
                        raise
                    number += 1
            (self.versions_dir / name).chmod(0o555)
            fsync_dir(self.versions_dir)
            self._remember_last(number)
            hook("published")
            if activate:
                self._write_active(name)
        hook("activated")
        return name

    def _last_number(self) -> int:
        meta = read_json_file(self.root / "registry.json", "registry file")
        value = meta.get("last_version", 0)
        return value if isinstance(value, int) else 0

    def _remember_last(self, number: int) -> None:
        """Record the highest number ever used, so a deleted version's name is never reused."""
        meta = read_json_file(self.root / "registry.json", "registry file")
        if number > meta.get("last_version", 0):
            write_json_atomic(self.root / "registry.json", {**meta, "last_version": number})

    def _write_active(self, name: str) -> None:
        try:
            previous = self.active_version()
        except CimisError:
            previous = None
        write_json_atomic(self.root / "active.json", {
            "format": ACTIVE_FORMAT, "version": name, "previous": previous, "updated": now_iso(),
        })

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers of this registry (publish, activate, delete) across processes."""
        with exclusive_lock(self.root / ".lock"):
            yield


def _summary_json(summary: dict, card: dict) -> dict:
    out = {"format": SUMMARY_FORMAT, "created": now_iso(), "cimis_version": __version__}
    out.update(summary)
    out.setdefault("classes", [c.get("name") for c in card.get("classes", []) if isinstance(c, dict)])
    out["format"] = SUMMARY_FORMAT
    return out


def _normalise_version(version: str) -> str:
    """``"v3"``, ``"3"`` or ``"v0003"`` -> ``"v0003"``; anything else (paths included) is refused."""
    text = str(version).strip()
    m = re.fullmatch(r"v?(\d{1,9})", text)
    if not m:
        raise CimisError(f"{version!r} is not a version name", "versions are named like v0003 (see `cimis models list`)")
    return f"v{int(m.group(1)):04d}"


def _version_number(name: str) -> int:
    return int(name[1:])
