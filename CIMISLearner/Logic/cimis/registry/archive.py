"""Version archives (``cimis models export`` / ``import``): plain tar.gz files whose members are checked (names,
types, sizes) before a single byte is extracted, read through a guard against decompression bombs."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from cimis.errors import CimisError
from cimis.model.card_limits import check_card_fields
from cimis.registry.model_folder import (
    CARD,
    JSON_LIMIT,
    PICKLE_SUFFIXES,
    TENSOR_FILES,
    TENSOR_LIMIT,
    VERSION_FILES,
    WEIGHTS,
    describe_pickle,
    read_json_file,
    verify_model_folder,
)


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
        if base.lower().endswith(PICKLE_SUFFIXES):
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


def extract_members(path: Path, members: list[tuple[tarfile.TarInfo, str]], stage: Path) -> None:
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
