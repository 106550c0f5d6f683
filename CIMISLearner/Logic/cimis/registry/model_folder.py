"""What a model folder (a registry version, an import, a job's finished model) may hold, and its cheap check.

:func:`verify_model_folder` (JSON, file names, safetensors headers, SHA-256) imports neither torch nor MONAI;
:func:`full_load_check` loads the model through ``cimis.model.modelfile``. A tensor file that is a pickle
(``torch.save``) is refused by its first bytes, before any library parses it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cimis.checksums import sha256_of
from cimis.data.classes import ClassSet
from cimis.errors import CimisError
from cimis.model.card_limits import check_card_fields

CARD_FORMAT = "cimis-model/1"  # the model card's format (cimis.model.modelfile.CARD_FORMAT, without torch)

CARD = "card.json"
WEIGHTS = "weights.safetensors"
PROTOTYPES = "prototypes.safetensors"
SUMMARY = "summary.json"
TENSOR_FILES = (WEIGHTS, PROTOTYPES)
VERSION_FILES = (CARD, WEIGHTS, PROTOTYPES, SUMMARY)
JSON_LIMIT = 64 * 2**20  # a card or summary larger than this is not one of ours
TENSOR_LIMIT = 64 * 2**30

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".npy", ".npz", ".joblib")


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
            if item.name.lower().endswith(PICKLE_SUFFIXES):
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


def full_load_check(folder: Path, where: str) -> None:
    """Load the model as the worker will (network shapes against the card), so a bad import never appears."""
    from cimis.model.modelfile import load_model, load_prototypes

    try:
        _, card = load_model(folder)
        load_prototypes(folder, card)
    except CimisError as exc:
        raise CimisError(f"{where}: {exc.message}", exc.hint) from None
