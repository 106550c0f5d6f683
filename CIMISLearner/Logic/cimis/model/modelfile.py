"""Model files: a folder with the weights in safetensors and a JSON card. Loading never runs code.

Layout of a model folder::

    card.json                classes (names, label values, colours), network and preprocessing settings,
                             training history, metrics, and the SHA-256 of every tensor file
    weights.safetensors      the network's state dict
    prototypes.safetensors   optional: the global class prototypes ``prototypes (C, D)`` and ``valid (C,)``
                             of the incremental methods, computed at the end of each step

Pickle-based checkpoints (``torch.save``) are refused: unpickling can execute arbitrary code.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from

from cimis.checksums import sha256_of
from cimis import __version__
from cimis.data.classes import ClassSet
from cimis.data.io import check_replaceable_folder, replace_folder
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.model.card_limits import check_card_fields
from cimis.model.network import NetworkConfig, SegmentationNet

CARD_FORMAT = "cimis-model/1"
CARD_NAME = "card.json"
WEIGHTS_NAME = "weights.safetensors"
PROTOTYPES_NAME = "prototypes.safetensors"
# What a model folder holds at its top: --overwrite replaces a folder holding only these.
MODEL_ENTRIES = {CARD_NAME, WEIGHTS_NAME, PROTOTYPES_NAME}


@dataclass
class ModelCard:
    """Everything about a model except its tensors."""

    classes: ClassSet
    network: NetworkConfig
    preprocessing: PreprocessConfig
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    created: str = ""
    cimis_version: str = __version__

    def to_json(self) -> dict:
        return {
            "format": CARD_FORMAT,
            "cimis_version": self.cimis_version,
            "created": self.created,
            "classes": self.classes.to_json(),
            "network": self.network.to_json(),
            "preprocessing": self.preprocessing.to_json(),
            "history": self.history,
            "metrics": self.metrics,
            "checksums": self.checksums,
        }

    @staticmethod
    def from_json(d: dict, where: str = "card") -> "ModelCard":
        if not isinstance(d, dict) or d.get("format") != CARD_FORMAT:
            raise CimisError(f"{where} is not a CIMISLearner model card (expected format {CARD_FORMAT!r})")
        check_card_fields(d, where)
        try:
            return ModelCard(
                classes=ClassSet.from_json(d["classes"]),
                network=NetworkConfig.from_json(d["network"]),
                preprocessing=PreprocessConfig.from_json(d["preprocessing"]),
                history=list(d.get("history", [])),
                metrics=dict(d.get("metrics", {})),
                checksums=dict(d.get("checksums", {})),
                created=str(d.get("created", "")),
                cimis_version=str(d.get("cimis_version", "")),
            )
        except KeyError as exc:
            raise CimisError(f"{where} lacks the field {exc.args[0]!r}") from exc
        except TypeError as exc:
            raise CimisError(f"{where} has a malformed field: {exc}") from exc


def save_model(
    folder: str | Path,
    net: SegmentationNet,
    card: ModelCard,
    overwrite: bool = False,
    prototypes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Write ``net`` and ``card`` as a model folder; the folder appears complete or not at all.

    The files are written to a temporary sibling folder which then takes the place of ``folder``
    (:func:`~cimis.data.io.replace_folder`), so a crash mid-write never leaves a half-written model, or no
    model, under ``folder``. ``overwrite`` replaces only an earlier model folder (:func:`check_model_output`).
    """
    folder = Path(folder)
    check_model_output(folder, overwrite)
    if net.num_channels != card.classes.num_channels:
        raise ValueError(f"network has {net.num_channels} outputs but the card lists {card.classes.num_channels}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)
    try:
        # safetensors' save_model drops the aliases DynUNet keeps of its own layers (skip_layers).
        save_safetensors_from(net, str(staging / WEIGHTS_NAME), metadata={"format": CARD_FORMAT})
        card.checksums = {WEIGHTS_NAME: sha256_of(staging / WEIGHTS_NAME)}
        if prototypes is not None:
            bank, valid = prototypes
            save_file({"prototypes": bank.detach().float().cpu().contiguous(),
                       "valid": valid.detach().to(torch.uint8).cpu().contiguous()}, str(staging / PROTOTYPES_NAME))
            card.checksums[PROTOTYPES_NAME] = sha256_of(staging / PROTOTYPES_NAME)
        card.created = card.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (staging / CARD_NAME).write_text(json.dumps(card.to_json(), indent=2) + "\n")
        replace_folder(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_model_output(folder: str | Path, overwrite: bool) -> None:
    """Refuse to write a model to ``folder`` when it is a file (or lies under one), or is a non-empty folder
    and ``overwrite`` is false, or holds anything but an earlier model: a user's own files are never
    deleted. Commands call this before training, so a refusal costs nothing."""
    check_replaceable_folder(folder, overwrite, MODEL_ENTRIES, CARD_NAME, "model folder")


def _refuse_non_model(path: Path) -> None:
    """Say clearly what a path is when it is not a model folder (a pickle checkpoint gets its own message)."""
    if not path.exists():
        raise CimisError(f"model {path} does not exist")
    if path.is_file():
        head = path.read_bytes()[:4]
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise CimisError(
                f"{path} is a pickle-based PyTorch checkpoint, which CIMISLearner refuses to load "
                "because unpickling can run code",
                "convert it to a model folder (weights.safetensors + card.json)",
            )
        raise CimisError(f"{path} is a file; a model is a folder with {CARD_NAME} and {WEIGHTS_NAME}")


def load_card(folder: str | Path) -> ModelCard:
    """Read and check a model folder's card."""
    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        _refuse_non_model(folder)
        raise CimisError(f"{folder} has no {CARD_NAME}: it is not a CIMISLearner model folder")
    from cimis.registry import JSON_LIMIT

    path = folder / CARD_NAME
    if path.stat().st_size > JSON_LIMIT:
        raise CimisError(f"{path} is too large to be a CIMISLearner model card", "the model file is corrupted")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: bad syntax, or an integer of >4300 digits
        raise CimisError(f"{path} is not valid JSON ({str(exc)[:200]})", "the model file is corrupted") from None
    except RecursionError:
        raise CimisError(f"{path} is not valid JSON for a model card (nested too deeply)",
                         "the model file is corrupted") from None
    return ModelCard.from_json(data, where=str(folder / CARD_NAME))


def _verify_checksum(folder: Path, name: str, card: ModelCard) -> None:
    expected = card.checksums.get(name)
    if expected and sha256_of(folder / name) != expected:
        raise CimisError(f"{folder / name} does not match the checksum in its card", "the model file is corrupted or was modified")


def load_prototypes(folder: str | Path, card: ModelCard | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's global prototypes ``(C, D)`` and validity mask ``(C,)``, or None if it has none."""
    folder = Path(folder)
    card = card or load_card(folder)
    path = folder / PROTOTYPES_NAME
    if not path.is_file():
        if PROTOTYPES_NAME in card.checksums:
            raise CimisError(f"{path} is missing", "the model folder is incomplete")
        return None
    _verify_checksum(folder, PROTOTYPES_NAME, card)
    try:
        tensors = load_file(str(path))
        bank, valid = tensors["prototypes"], tensors["valid"].bool()
    except (SafetensorError, OSError, KeyError) as exc:
        raise CimisError(f"{path} cannot be read ({exc})", "the model file is corrupted") from exc
    if not bank.dtype.is_floating_point or not bool(torch.isfinite(bank).all()):
        raise CimisError(f"{path}: the prototypes are not finite floating-point values", "the model file is corrupted")
    if bank.shape != (card.classes.num_channels, card.network.feature_dim) or valid.shape != (bank.shape[0],):
        raise CimisError(f"{path} does not fit the model's classes and features", "the model file is corrupted")
    return bank, valid


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SegmentationNet, ModelCard]:
    """Rebuild the network from the card and load its weights, after checking their checksum."""
    folder = Path(folder)
    card = load_card(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CimisError(f"{folder} has no {WEIGHTS_NAME}", "the model folder is incomplete")
    _refuse_pickled_tensors(weights)
    _verify_checksum(folder, WEIGHTS_NAME, card)
    expected = _expected_tensors(card)
    _check_weight_values(weights, expected)
    _check_network_fits_file(weights, expected)
    net = SegmentationNet(card.network, card.classes.num_channels)
    try:
        missing, unexpected = load_safetensors_into(net, str(weights), strict=False, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CimisError(f"{weights} cannot be read as safetensors ({exc})", "the model file is corrupted") from exc
    except RuntimeError as exc:  # tensor shapes that do not fit the card's network
        raise CimisError(f"{weights} does not fit the network described in its card", "the model file is corrupted") from exc
    if missing or unexpected:
        raise CimisError(
            f"{weights} does not fit the network described in its card "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)",
            "the model file is corrupted or from an incompatible version",
        )
    return net.to(device).eval(), card


def _refuse_pickled_tensors(path: Path) -> None:
    """A pickle named like a tensor file is named as such (docs/model-file.md), before any parser sees it."""
    from cimis.registry import describe_pickle

    with open(path, "rb") as f:
        pickle = describe_pickle(path, f.read(4))
    if pickle:
        raise CimisError(pickle, "use a model folder with safetensors weights (weights.safetensors + card.json)")


def _expected_tensors(card: ModelCard) -> dict[str, torch.Tensor]:
    """The network's tensors as the card describes it, built on the meta device (nothing is allocated)."""
    from cimis.model.imported import build_on_meta

    probe = build_on_meta(lambda: SegmentationNet(card.network, card.classes.num_channels))
    return {**dict(probe.named_parameters()), **dict(probe.named_buffers())}


def _check_network_fits_file(weights: Path, expected: dict[str, torch.Tensor]) -> None:
    """Refuse, before allocating it, a network that needs more bytes than its weights file holds."""
    needed = sum(t.numel() * t.element_size() for t in expected.values())
    if needed > weights.stat().st_size:
        raise CimisError(f"{weights}: the card's 'network' and 'classes' describe a network of {needed} bytes, "
                         f"more than the {weights.stat().st_size}-byte weights file holds",
                         "the model file is corrupted or from an incompatible version")


def _check_weight_values(weights: Path, expected: dict[str, torch.Tensor]) -> None:
    """Every weight the network reads as floating point is stored as floating point and finite: int8, bool,
    NaN or infinite weights would load (converted) and segment everything as background."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                want = expected.get(name)
                if want is None or not want.dtype.is_floating_point:
                    continue  # an unknown name is reported by the load; integer buffers keep their dtype
                tensor = f.get_tensor(name)
                if not tensor.dtype.is_floating_point:
                    raise CimisError(f"{weights}: tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}, "
                                     "not floating point", "the model file is corrupted")
                if not bool(torch.isfinite(tensor).all()):
                    raise CimisError(f"{weights}: tensor {name!r} holds NaN or infinite values",
                                     "the model is broken (training diverged?) or the file is corrupted")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CimisError(f"{weights} cannot be read as safetensors ({exc})", "the model file is corrupted") from exc
