"""The model registry: a folder of immutable model versions and an atomically updated active-version pointer.

Layout (docs/registry.md)::

    REGISTRY/
      registry.json          {"format": "cimis-registry/1", "created", "last_version"}
      active.json            {"format": "cimis-active/1", "version": "v0003", "previous": "v0002", "updated"}
      versions/v0001/        card.json, weights.safetensors, prototypes.safetensors, summary.json (read-only)
      staging/               versions being written (named PID-RANDOM-HOST-BOOT); never read, swept when
                             their writer on this machine is dead, or when a day old
      trash/                 versions being deleted; never read, swept
      .lock                  serialises writers (advisory file lock, released by the kernel on kill -9)

A version appears by one ``rename`` of a complete, checked, fsynced folder from ``staging/`` into
``versions/``; the active pointer changes by one ``os.replace`` of ``active.json``. A process killed at any
moment therefore leaves every published version whole and the pointer on a whole version. Nothing in a
version is ever modified; rollback is :meth:`Registry.activate` of an earlier version.

Only JSON and safetensors are read: a tensor file that is a pickle (``torch.save``) is refused by its first
bytes, before any library parses it. Archives (``export`` / ``import``) are plain tar.gz files whose members
are checked (names, types, sizes) before a single byte is extracted.

The cheap checks here (:func:`verify_model_folder`: JSON, file names, safetensors headers, SHA-256) import
neither torch nor MONAI; :meth:`Registry.load` does the full load through ``cimis.model.modelfile``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import struct
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from cimis import __version__
from cimis.data.classes import ClassSet
from cimis.errors import CimisError
from cimis.model.card_limits import check_card_fields

REGISTRY_FORMAT = "cimis-registry/1"
ACTIVE_FORMAT = "cimis-active/1"
SUMMARY_FORMAT = "cimis-version/1"
CARD_FORMAT = "cimis-model/1"  # the model card's format (cimis.model.modelfile.CARD_FORMAT, without torch)

CARD = "card.json"
WEIGHTS = "weights.safetensors"
PROTOTYPES = "prototypes.safetensors"
SUMMARY = "summary.json"
TENSOR_FILES = (WEIGHTS, PROTOTYPES)
VERSION_FILES = (CARD, WEIGHTS, PROTOTYPES, SUMMARY)
JSON_LIMIT = 64 * 2**20  # a card or summary larger than this is not one of ours
TENSOR_LIMIT = 64 * 2**30

_VERSION_NAME = re.compile(r"v(\d{4,9})")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".npy", ".npz", ".joblib")
_STALE_STAGING_S = 24 * 3600

StepHook = Callable[[str], None]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ cheap checks
def describe_pickle(path: Path | str, head: bytes) -> str | None:
    """A message when ``head`` (a file's first bytes) is a pickle or a ``torch.save`` zip, else None."""
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        return (f"{path} is a pickle-based PyTorch file, which CIMISLearner refuses to load because "
                "unpickling can run arbitrary code")
    return None


def check_safetensors_file(path: Path, where: str) -> None:
    """Refuse a tensor file that is not safetensors (a pickle gets its own message) from its first bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CimisError(f"{where}: cannot read {path.name} ({exc.strerror or exc})") from None
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return
    pickle = describe_pickle(path.name, head)
    if pickle:
        raise CimisError(f"{where}: {pickle}", "use a model folder with safetensors weights, e.g. exported by `cimis models export`")
    raise CimisError(f"{where}: {path.name} is not a safetensors file (truncated or corrupted)",
                     "the model file is damaged; activate another version or import the model again")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: Path, what: str, hint: str | None = None) -> dict:
    """A JSON object from ``path``; a missing, oversized, unreadable or non-object file is a CimisError."""
    try:
        if path.stat().st_size > JSON_LIMIT:
            raise CimisError(f"{what} {path} is too large to be a CIMISLearner file", hint)
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CimisError(f"{what} {path} is missing", hint) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an integer of >4300 digits
        raise CimisError(f"{what} {path} is unreadable or truncated ({str(exc)[:200]})", hint) from None
    except RecursionError:
        raise CimisError(f"{what} {path} is nested too deeply to be a CIMISLearner file", hint) from None
    if not isinstance(data, dict):
        raise CimisError(f"{what} {path} is not a JSON object", hint)
    return data


def verify_model_folder(folder: Path, where: str | None = None, extra_files: tuple[str, ...] = ()) -> dict:
    """Check a model folder without loading it; returns its card as JSON.

    Checks: only known file names (a pickle file gets its own message), a readable ``cimis-model/1`` card
    with a class list, every tensor file a safetensors file whose SHA-256 matches the card, the weights
    present and recorded. Raises :class:`CimisError` starting with ``where``.
    """
    folder = Path(folder)
    where = where or str(folder)
    damaged = "the model files are damaged; activate another version (cimis models activate) or import the model again"
    if not folder.is_dir():
        raise CimisError(f"{where}: {folder} is not a folder")
    for item in folder.iterdir():
        if item.name not in VERSION_FILES + extra_files:
            if item.name.lower().endswith(_PICKLE_SUFFIXES):
                raise CimisError(f"{where}: {item.name} looks like a pickle-based file, which is never loaded",
                                 "a model holds only card.json, summary.json and safetensors files")
            raise CimisError(f"{where}: unexpected file {item.name!r} in a model folder",
                             "a model holds only card.json, weights.safetensors, prototypes.safetensors and summary.json")
        if item.is_symlink() or not item.is_file():
            raise CimisError(f"{where}: {item.name} is not a regular file")
    card = read_json_file(folder / CARD, f"{where}: the model card", damaged)
    if card.get("format") != CARD_FORMAT:
        raise CimisError(f"{where}: {CARD} is not a CIMISLearner model card (format {card.get('format')!r})", damaged)
    check_card_fields(card, f"{where}: {CARD}")
    classes_of(card, where)
    checksums = card.get("checksums")
    if not isinstance(checksums, dict) or WEIGHTS not in checksums:
        raise CimisError(f"{where}: the card records no checksum for {WEIGHTS}", damaged)
    if not (folder / WEIGHTS).is_file():
        raise CimisError(f"{where}: {WEIGHTS} is missing", damaged)
    for name in TENSOR_FILES:
        path = folder / name
        if not path.is_file():
            if name in checksums:
                raise CimisError(f"{where}: {name} is missing", damaged)
            continue
        check_safetensors_file(path, where)
        if name not in checksums:
            raise CimisError(f"{where}: the card records no checksum for {name}", damaged)
        if sha256_of(path) != checksums[name]:
            raise CimisError(f"{where}: {name} does not match the checksum recorded when it was saved "
                             "(the file is corrupted, truncated or was modified)", damaged)
    return card


def classes_of(card: dict, where: str = "model") -> ClassSet:
    """The class list of a card in JSON form."""
    try:
        return ClassSet.from_json(card.get("classes"))
    except CimisError as exc:
        raise CimisError(f"{where}: {exc.message}", "the model card is damaged") from None


# ------------------------------------------------------------------------------------------ registry
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
    """A model registry folder (see the module docstring for its layout and guarantees)."""

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
        _write_json_atomic(marker, {"format": REGISTRY_FORMAT, "created": now_iso(), "last_version": 0})
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
                    _copy_synced(source, stage / name)
                    if first:
                        hook("partial")
                        first = False
            _write_synced(stage / SUMMARY, _summary_json(summary, card))
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
                        _copy_synced(source / name, stage / name)
            else:
                _extract_members(source, members, stage)
            hook("partial")
            card = verify_model_folder(stage, f"the imported model {source.name}")
            _full_load_check(stage, f"the imported model {source.name}")
            original = {}
            if (stage / SUMMARY).is_file():
                original = read_json_file(stage / SUMMARY, f"the imported model {source.name}: summary.json")
            summary = {**original, "imported": {"from": source.name, "at": now_iso(), "previous_summary": bool(original)}}
            summary.setdefault("kind", "import")
            (stage / SUMMARY).unlink(missing_ok=True)
            _write_synced(stage / SUMMARY, _summary_json(summary, card))
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
            _fsync_dir(self.versions_dir)
        _remove_tree(target)
        return name

    def export(self, version: str | None, archive: str | Path, overwrite: bool = False) -> Path:
        """Write one version as a .tar.gz (flat: card.json, *.safetensors, summary.json); returns the path."""
        name = self.resolve(version)
        self.verify(name)
        archive = Path(archive).absolute()
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
                    if folder == self.trash_dir or _stale(item):
                        _remove_tree(item)

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
                _remove_tree(stage)

    def _seal(self, stage: Path) -> None:
        """Check the staged version, make its files read-only and flush it to disk."""
        verify_model_folder(stage, "the staged version")
        for item in stage.iterdir():
            item.chmod(0o444)
        _fsync_dir(stage)

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
            _fsync_dir(self.versions_dir)
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
            _write_json_atomic(self.root / "registry.json", {**meta, "last_version": number})

    def _write_active(self, name: str) -> None:
        try:
            previous = self.active_version()
        except CimisError:
            previous = None
        _write_json_atomic(self.root / "active.json", {
            "format": ACTIVE_FORMAT, "version": name, "previous": previous, "updated": now_iso(),
        })

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers of this registry (publish, activate, delete) across processes."""
        with open(self.root / ".lock", "a+b") as handle:
            _lock_file(handle)
            try:
                yield
            finally:
                _unlock_file(handle)


# ------------------------------------------------------------------------------------------ archives
def check_import_source(source: Path) -> list[tuple[tarfile.TarInfo, str]] | None:
    """Check what ``import`` would read: a model folder (returns None) or an archive (returns its checked
    members). Nothing is written."""
    if source.is_dir():
        verify_model_folder(source, f"the model folder {source}")
        return None
    if source.is_file():
        return _checked_archive_members(source)
    raise CimisError(f"{source} does not exist")


def _checked_archive_members(path: Path) -> list[tuple[tarfile.TarInfo, str]]:
    """The members of a version archive with the file name each becomes, after checking all of them."""
    with open(path, "rb") as f:
        head = f.read(8)
    pickle = describe_pickle(path, head)
    if pickle and head[:4] == b"PK\x03\x04" and not _zip_holds_pickle(path):
        raise CimisError(f"{path} is a zip archive", "models are exchanged as .tar.gz files written by `cimis models export`")
    if pickle:
        raise CimisError(pickle, "export the model with `cimis models export` and import that archive")
    members: list[tuple[tarfile.TarInfo, str]] = []
    opened = False
    try:
        with _open_archive(path) as tar:
            opened = True
            infos = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not opened:
            raise CimisError(f"{path} is not a model archive (.tar.gz): {exc}",
                             "import an archive written by `cimis models export`, or a model folder") from None
        raise CimisError(f"{path} is truncated or corrupted ({exc})", "export the model again") from None
    top_dirs = set()
    for info in infos:
        name = info.name
        pure = PurePosixPath(name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name or pure.is_absolute():
            raise CimisError(f"{path} holds the absolute path {name!r}; refusing to import it",
                             "an archive may only hold the files of one model version")
        if ".." in pure.parts:
            raise CimisError(f"{path} holds the path {name!r}, which would escape the target folder; refusing to import it",
                             "an archive may only hold the files of one model version")
        parts = [p for p in pure.parts if p not in ("", ".")]
        if info.issym() or info.islnk():
            raise CimisError(f"{path} holds a link ({name!r} -> {info.linkname!r}); refusing to import it",
                             "an archive may only hold regular files")
        if info.isdir():
            if len(parts) > 1:
                raise CimisError(f"{path} holds nested folders ({name!r})", "an archive holds one model version")
            top_dirs.update(parts)
            continue
        if not info.isreg():
            raise CimisError(f"{path} holds {name!r}, which is not a regular file; refusing to import it")
        if len(parts) == 2:
            top_dirs.add(parts[0])
        elif len(parts) != 1:
            raise CimisError(f"{path} holds {name!r} in a nested folder", "an archive holds one model version")
        base = parts[-1]
        if base.lower().endswith(_PICKLE_SUFFIXES):
            raise CimisError(f"{path} holds {base!r}, a pickle-based file, which is never loaded; refusing to import it",
                             "a model holds only card.json, summary.json and safetensors files")
        if base not in VERSION_FILES:
            raise CimisError(f"{path} holds the unexpected file {name!r}; refusing to import it",
                             "a model holds only card.json, weights.safetensors, prototypes.safetensors and summary.json")
        limit = TENSOR_LIMIT if base in TENSOR_FILES else JSON_LIMIT
        if info.size > limit:
            raise CimisError(f"{path}: {name} is implausibly large ({info.size} bytes)")
        if any(base == b for _, b in members):
            raise CimisError(f"{path} holds {base} twice")
        members.append((info, base))
    if len(top_dirs) > 1:
        raise CimisError(f"{path} holds several folders {sorted(top_dirs)}", "an archive holds one model version")
    names = {b for _, b in members}
    for required in (CARD, WEIGHTS):
        if required not in names:
            raise CimisError(f"{path} has no {required}", "import an archive written by `cimis models export`")
    return members


def _zip_holds_pickle(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith((".pkl", "data.pkl")) for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _extract_members(path: Path, members: list[tuple[tarfile.TarInfo, str]], stage: Path) -> None:
    """Copy the checked members' bytes into ``stage`` under their checked base names (never the member path).

    The card comes first; the tensor files may then be no larger than the network and classes it declares
    need, so an archive cannot fill the disk with more than the model it claims to be. Decompression is
    watched throughout (:class:`_ExpansionGuard`).
    """
    ordered = sorted(members, key=lambda m: m[1] != CARD)
    try:
        with _open_archive(path) as tar:
            for info, base in ordered:
                if base in TENSOR_FILES:
                    limit = _tensor_file_limit(stage / CARD, base)
                    if info.size > limit:
                        raise CimisError(f"{path}: {info.name} holds {info.size} bytes, more than the {limit} that "
                                         f"the model its card describes can need; refusing to import it",
                                         "import an archive written by `cimis models export`")
                source = tar.extractfile(info)
                if source is None:
                    raise CimisError(f"{path}: cannot read {info.name}")
                target = stage / base
                with source, open(target, "xb") as out:
                    copied = _copy_limited(source, out, info.size)
                    out.flush()
                    os.fsync(out.fileno())
                if copied != info.size:
                    raise CimisError(f"{path} is truncated ({info.name} ends early)", "export the model again")
                if base == CARD:
                    card = read_json_file(target, f"{path}: the model card", "export the model again")
                    check_card_fields(card, f"{path}: {CARD}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CimisError(f"{path} is truncated or corrupted ({exc})", "export the model again") from None


def _tensor_file_limit(card_path: Path, name: str) -> int:
    """The largest ``name`` the (checked) card's model can need: its tensors in 32-bit floats plus the
    safetensors header (one JSON entry per tensor)."""
    from cimis.model.modelfile import ModelCard, _expected_tensors

    card = ModelCard.from_json(read_json_file(card_path, "the model card"), str(card_path))
    if name == WEIGHTS:
        tensors = _expected_tensors(card)
        data = sum(t.numel() * max(t.element_size(), 4) for t in tensors.values())
    else:  # prototypes (C, D) and valid (C,)
        tensors = {"prototypes": None, "valid": None}
        data = card.classes.num_channels * (card.network.feature_dim * 4 + 1)
    return data + 2**16 + 512 * len(tensors)


# Decompression bombs: a model's float weights barely compress (about 1.1:1) and its JSON perhaps 10:1;
# an archive expanding over 100 times, beyond the first 32 MiB, is refused as it is read.
_MAX_EXPANSION = 100
_EXPANSION_GRACE = 32 * 2**20


class _ExpansionGuard(io.RawIOBase):
    """A decompressing, seekable reader of a (gzip, bzip2, xz or plain) tar file that raises
    :class:`CimisError` as soon as the bytes it has expanded exceed :data:`_MAX_EXPANSION` times the
    compressed bytes read (after :data:`_EXPANSION_GRACE`). Seeking forward reads through in blocks."""

    def __init__(self, path: Path):
        import bz2
        import gzip
        import lzma

        super().__init__()
        self.path = path
        self.raw = open(path, "rb")
        magic = self.raw.read(6)
        self.raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif magic[:3] == b"BZh":
            self.stream = bz2.BZ2File(self.raw)
        elif magic == b"\xfd7zXZ\x00":
            self.stream = lzma.LZMAFile(self.raw)
        else:
            self.stream = self.raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.stream.tell()

    def _check(self) -> None:
        if self.stream is self.raw:
            return
        expanded = self.stream.tell()
        if expanded > _EXPANSION_GRACE and expanded > _MAX_EXPANSION * max(self.raw.tell(), 1):
            raise CimisError(f"{self.path} expands more than {_MAX_EXPANSION} times when decompressed "
                             f"({expanded} bytes from {self.raw.tell()}): a decompression bomb, not a model; "
                             "refusing to import it", "import an archive written by `cimis models export`")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        chunks = []
        while size > 0:
            block = self.stream.read(min(size, 1 << 20))
            self._check()
            if not block:
                break
            chunks.append(block)
            size -= len(block)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.tell()
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("seek from the end")
        if offset < self.tell():
            self.stream.seek(offset)  # back: decompression restarts from the beginning
        while self.tell() < offset:
            if not self.read(min(offset - self.tell(), 1 << 20)):
                break
        return self.tell()

    def close(self) -> None:
        try:
            if self.stream is not self.raw:
                self.stream.close()
            self.raw.close()
        finally:
            super().close()


@contextlib.contextmanager
def _open_archive(path: Path) -> Iterator[tarfile.TarFile]:
    """``path`` as a tar file read through an :class:`_ExpansionGuard`."""
    guard = _ExpansionGuard(path)
    try:
        with tarfile.open(fileobj=guard, mode="r:") as tar:
            yield tar
    finally:
        guard.close()


def _copy_limited(source: io.BufferedReader, out, size: int) -> int:
    copied = 0
    while copied < size:
        block = source.read(min(1 << 20, size - copied))
        if not block:
            break
        out.write(block)
        copied += len(block)
    return copied


def _full_load_check(folder: Path, where: str) -> None:
    """Load the model as the worker will (network shapes against the card), so a bad import never appears."""
    from cimis.model.modelfile import load_model, load_prototypes

    try:
        _, card = load_model(folder)
        load_prototypes(folder, card)
    except CimisError as exc:
        raise CimisError(f"{where}: {exc.message}", exc.hint) from None


# ------------------------------------------------------------------------------------------- helpers
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


def _machine_tag(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:12]


def _this_host() -> str:
    return _machine_tag(socket.gethostname())


def _this_boot() -> str:
    """This machine's boot (Linux: its boot id); "0" where unknown."""
    try:
        return _machine_tag(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        return "0"


def staging_name(pid: int, host: str | None = None, boot: str | None = None) -> str:
    """``PID-RANDOM-HOST-BOOT``: who writes a staging folder, so that a sweep on a registry shared by several
    machines (a network folder) judges only its own machine's writers (host and boot are hashes)."""
    return f"{pid}-{uuid.uuid4().hex[:12]}-{host or _this_host()}-{boot or _this_boot()}"


def _newest_mtime(item: Path) -> float:
    times = [item.stat().st_mtime]
    if item.is_dir():
        times += [child.stat().st_mtime for child in item.iterdir()]
    return max(times)


def _stale(item: Path) -> bool:
    """Whether a staging entry's writer is gone: a process of this machine and boot that no longer runs,
    a process of an earlier boot of this machine, or anything untouched for a day. Another machine's
    entries (and entries of unknown origin) are left alone until then: their processes cannot be seen."""
    try:
        if time.time() - _newest_mtime(item) > _STALE_STAGING_S:
            return True
    except OSError:
        return True  # vanished or unreadable: nothing of a live writer
    parts = item.name.split("-")
    if len(parts) != 4 or not parts[0].isdigit() or parts[2] != _this_host():
        return False
    if parts[3] != _this_boot():
        return True  # written before this machine last booted
    pid = int(parts[0])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def _copy_synced(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def _write_synced(path: Path, data: dict) -> None:
    with open(path, "x", encoding="utf-8") as out:
        out.write(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
        out.flush()
        os.fsync(out.fileno())


def _write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=2, allow_nan=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk where the platform allows it."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """rmtree that also removes read-only version files and folders."""

    def make_writable(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            os.chmod(target, stat.S_IRWXU)
            func(target)
        except OSError:
            pass

    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        path.chmod(stat.S_IRWXU)
        shutil.rmtree(path, onerror=make_writable)
    else:
        path.unlink()


def _lock_file(handle) -> None:
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:
                time.sleep(0.1)


def _unlock_file(handle) -> None:
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except ImportError:
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


# ----------------------------------------------------------------------------------- `cimis models`
def models_command(args) -> None:
    """``cimis models ACTION``: list, show, activate, delete, export, import (wired in cli.py)."""
    if args.action == "import":
        check_import_source(Path(args.source))  # before a missing registry is created for it
    registry = Registry.open(args.registry, create=args.action == "import")
    if args.action == "list":
        infos = registry.list()
        if args.json:
            print(json.dumps([i.to_json() for i in infos], indent=2))
            return
        if not infos:
            print(f"no versions in {registry.root}")
            return
        for i in infos:
            mark = "*" if i.active else " "
            note = f"  {i.note}" if i.note else ""
            print(f"{mark} {i.name}  {i.created:25}  {i.kind or '-':7}  {', '.join(i.classes)}{note}")
        return
    if args.action == "show":
        info = registry.info(args.version or "active")
        card = registry.verify(info.name)
        if args.json:
            print(json.dumps({**info.to_json(), "card": card, "checksums": "ok"}, indent=2))
            return
        print(f"{info.name}{' (active)' if info.active else ''}  {info.path}")
        print(f"  created   {info.created}")
        print(f"  kind      {info.kind or '-'}")
        classes = ", ".join(f"{c.get('name')} ({c.get('value')})" for c in card["classes"])
        print(f"  classes   {classes}")
        if info.note:
            print(f"  note      {info.note}")
        metrics = card.get("metrics", {}).get("validation", {})
        if metrics.get("dice"):
            dice = ", ".join(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} -" for k, v in metrics["dice"].items())
            print(f"  dice      {dice}")
        print("  checksums ok")
        return
    if args.action == "activate":
        print(f"active version: {registry.activate(args.version)}")
    elif args.action == "delete":
        print(f"deleted {registry.delete(args.version)}")
    elif args.action == "export":
        print(f"exported {registry.resolve(args.version)} to {registry.export(args.version, args.out, args.overwrite)}")
    elif args.action == "import":
        name = registry.import_model(args.source, activate=args.activate)
        print(f"imported {args.source} as {name}{' (active)' if args.activate else ''}")
