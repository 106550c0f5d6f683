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

The cheap checks (:func:`verify_model_folder`: JSON, file names, safetensors headers, SHA-256) import
neither torch nor MONAI; :meth:`Registry.load` does the full load through ``cimis.model.modelfile``.

One concept per module:

* :mod:`~cimis.registry.store` the registry folder: versions, the active pointer, publish, import, activate,
  delete, export;
* :mod:`~cimis.registry.model_folder` what a model folder holds and its checks;
* :mod:`~cimis.registry.staging` staging folder names and the host-aware sweep of dead writers' folders;
* :mod:`~cimis.registry.archive` version archives: member checks, extraction, the decompression-bomb guard;
* :mod:`~cimis.registry.durable_files` fsynced writes, atomic replacements, flushed renames;
* :mod:`~cimis.registry.file_lock` the writers' lock;
* :mod:`~cimis.registry.command` ``cimis models``.

This package re-exports the names other code imports from ``cimis.registry``.
"""

from cimis.registry.archive import check_import_source
from cimis.registry.command import models_command
from cimis.registry.model_folder import (
    CARD,
    CARD_FORMAT,
    JSON_LIMIT,
    PICKLE_SUFFIXES,
    PROTOTYPES,
    SUMMARY,
    TENSOR_FILES,
    TENSOR_LIMIT,
    VERSION_FILES,
    WEIGHTS,
    check_safetensors_file,
    classes_of,
    describe_pickle,
    read_json_file,
    sha256_of,
    verify_model_folder,
)
from cimis.registry.staging import staging_name
from cimis.registry.store import ACTIVE_FORMAT, REGISTRY_FORMAT, SUMMARY_FORMAT, Registry, StepHook, VersionInfo, now_iso

__all__ = [
    "ACTIVE_FORMAT", "CARD", "CARD_FORMAT", "JSON_LIMIT", "PICKLE_SUFFIXES", "PROTOTYPES", "REGISTRY_FORMAT",
    "SUMMARY", "SUMMARY_FORMAT", "TENSOR_FILES", "TENSOR_LIMIT", "VERSION_FILES", "WEIGHTS", "Registry", "StepHook",
    "VersionInfo", "check_import_source", "check_safetensors_file", "classes_of", "describe_pickle",
    "models_command", "now_iso", "read_json_file", "sha256_of", "staging_name", "verify_model_folder",
]
