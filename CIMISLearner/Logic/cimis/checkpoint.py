"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

Optimizer state dicts nest tensors inside dicts with integer keys; :func:`flatten` turns such a structure
into a flat ``{name: tensor}`` mapping plus a JSON skeleton that says where each tensor goes, and
:func:`unflatten` reverses it exactly (key types included).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from

from cimis.errors import CimisError
from cimis.fsync import sync_tree


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON skeleton of ``obj``; its tensors are moved into ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, prefix), flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        raise ValueError(f"unknown checkpoint entry {list(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write ``net``, ``optimizer`` and the JSON-able ``state`` to ``folder``, replacing it atomically.

    Rotation: the complete new checkpoint is staged; the current one becomes ``folder.old`` and is removed
    once the new one is in place. A kill at any point leaves a whole checkpoint in ``folder`` or, between
    the two renames, in ``folder.old``; a ``folder.old`` left half-removed by a kill is discarded here
    (``folder`` exists then, and it is whole: it only ever appears by a rename of a complete staging folder).
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    try:
        save_safetensors_from(net, str(staging / "model.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(optimizer.state_dict(), tensors, prefix="optimizer")
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps({**state, "optimizer": skeleton}, indent=1))
        sync_tree(staging)  # on disk before the previous checkpoint is let go
        old = _old_of(folder)
        if folder.is_dir():
            shutil.rmtree(old, ignore_errors=True)  # a leftover of a killed rotation: folder is newer
            os.replace(folder, old)
        # With no folder, old (if any) is the only whole checkpoint: it stays until staging is in place.
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cannot_write(folder: Path, exc: OSError) -> CimisError:
    return CimisError(f"cannot write the checkpoint in {folder.parent} ({exc.strerror or exc})",
                      "free disk space, make the run folder writable, or give a folder for --out; "
                      "the previous checkpoint is kept")


def _old_of(folder: Path) -> Path:
    return folder.with_name(folder.name + ".old")


def checkpoint_candidates(folder: Path) -> list[Path]:
    """The checkpoints a resume may use, best first: ``folder``, then ``folder.old`` (left by a kill
    between the two renames of a save); only those holding a ``state.json``."""
    folder = Path(folder)
    return [f for f in (folder, _old_of(folder)) if (f / "state.json").is_file()]


def load_checkpoint(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights and optimizer state from ``folder`` (or its ``.old`` rotation partner when ``folder`` is
    missing or unreadable) into ``net`` and ``optimizer``; return the state."""
    folder = Path(folder)
    candidates = checkpoint_candidates(folder)
    if not candidates:
        raise CimisError(f"no checkpoint to resume from in {folder.parent}", "run without --resume to start afresh")
    first_error: CimisError | None = None
    for candidate in candidates:
        try:
            return _load_one(candidate, net, optimizer)
        except CimisError as exc:
            first_error = first_error or exc
    raise first_error


_AFRESH = "start afresh with --overwrite instead of --resume (a worker job: give it a new output folder)"


def _load_one(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text())
        missing, unexpected = load_safetensors_into(net, str(folder / "model.safetensors"), strict=False)
        tensors = load_file(str(folder / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten(state.pop("optimizer"), tensors))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError,
            AttributeError, RecursionError) as exc:
        raise CimisError(f"the checkpoint in {folder} is unreadable ({type(exc).__name__}: {str(exc)[:200]})",
                         _AFRESH) from exc
    if missing or unexpected:
        raise CimisError(f"the checkpoint in {folder} does not fit this network", _AFRESH)
    return state
