"""What Import model is given, without Qt: a MONAI bundle folder, an nnU-Net v2 model folder, or our own model
archive or folder; and the classes a bundle or nnU-Net model offers for the class chooser (read from its
metadata.json or dataset.json, no weights loaded). The readers' own detection decides the kind."""

from __future__ import annotations

from pathlib import Path

from cimis.errors import CimisError

MONAI_BUNDLE, NNUNET, CIMIS_MODEL = "monai-bundle", "nnunet", "cimis"


def source_kind(source: str | Path) -> str:
    """``monai-bundle``, ``nnunet`` (both converted by the worker's import job) or ``cimis`` (an exported
    archive or a model folder, added by the registry at once)."""
    from cimis.model.monai_bundle import is_bundle
    from cimis.model.nnunet_source import is_nnunet_folder

    source = Path(source)
    if not source.exists():
        raise CimisError(f"{source} does not exist", "choose a model archive (.tar.gz) or a model folder")
    if source.is_dir():
        if is_nnunet_folder(source):  # checked first, as `cimis import-model` does
            return NNUNET
        if is_bundle(source):
            return MONAI_BUNDLE
    return CIMIS_MODEL


def source_classes(source: str | Path) -> list[str] | None:
    """The classes a bundle or nnU-Net model can keep, in channel order; None for our own models (imported
    whole). Raises with the file and key when the metadata names no classes."""
    kind = source_kind(source)
    if kind == MONAI_BUNDLE:
        from cimis.model.monai_bundle import bundle_class_names

        return bundle_class_names(Path(source))
    if kind == NNUNET:
        from cimis.model.nnunet_source import nnunet_class_names

        return nnunet_class_names(Path(source))
    return None


def parse_kept_classes(text: str, offered: list[str]) -> list[str] | None:
    """The class chooser's comma-separated answer as the names to keep; None keeps them all. Names are
    matched without regard to case and given back as the model spells them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CimisError("no class is chosen", "keep at least one of the model's classes")
    by_lower = {n.lower(): n for n in offered}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        shown = ", ".join(offered[:20]) + (" ..." if len(offered) > 20 else "")
        raise CimisError(f"the model has no class {unknown[0]!r}", f"its classes are: {shown}")
    kept = list(dict.fromkeys(by_lower[n.lower()] for n in names))
    return None if len(kept) == len(offered) else kept
