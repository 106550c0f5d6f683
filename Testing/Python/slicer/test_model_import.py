"""Import model from Slicer: a MONAI bundle or nnU-Net folder goes through the worker's import job with the
chosen classes; our own archive is added at once; the class chooser's list comes from the metadata alone."""

from __future__ import annotations

import json

import pytest

from cimis.errors import CimisError
from cimis.registry import Registry
from cimis_slicer.model_import import CIMIS_MODEL, MONAI_BUNDLE, NNUNET, parse_kept_classes, source_classes, source_kind
from cimis_slicer.workflow import Workflow

from ..engine.model.conftest import CLASS_NAMES, write_bundle


def nnunet_metadata(folder, labels: dict):
    """The two JSON files by which an nnU-Net v2 model folder is known (no checkpoint: none is read here)."""
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    (folder / "plans.json").write_text("{}")
    return folder


def test_the_class_chooser_lists_a_sources_classes_without_its_weights(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "models" / "model.pt").unlink()  # the list must not need the weights
    assert source_kind(bundle) == MONAI_BUNDLE and source_classes(bundle) == CLASS_NAMES
    nnunet = nnunet_metadata(tmp_path / "nnunet", {"background": 0, "spleen": 1, "kidney_right": 2, "liver": 3})
    assert source_kind(nnunet) == NNUNET and source_classes(nnunet) == ["spleen", "kidney_right", "liver"]
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"")
    assert source_kind(archive) == CIMIS_MODEL and source_classes(archive) is None
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {}}}))
    with pytest.raises(CimisError, match="channel_def"):
        source_classes(bundle)
    with pytest.raises(CimisError, match="does not exist"):
        source_kind(tmp_path / "missing")


def test_the_chosen_classes_are_checked_against_the_offered_ones():
    offered = ["liver", "spleen", "kidney"]
    assert parse_kept_classes("Kidney, liver", offered) == ["kidney", "liver"]
    assert parse_kept_classes("liver, spleen,kidney", offered) is None  # all of them: nothing to drop
    with pytest.raises(CimisError, match="no class 'pancreas'"):
        parse_kept_classes("liver, pancreas", offered)
    with pytest.raises(CimisError, match="no class is chosen"):
        parse_kept_classes(" , ", offered)


def test_a_bundle_is_imported_by_the_worker_an_archive_at_once_and_a_bad_bundle_is_one_error(kit, context, tmp_path):
    flow = Workflow(context, tmp_path / "registry", tmp_path / "jobs", env=kit.WORKER_ENV)
    try:
        folder = flow.import_model(write_bundle(tmp_path / "bundle"), classes=["spleen"], settings=kit.tiny_settings())
        assert flow.busy and (folder / "job.json").is_file()
        assert json.loads((folder / "job.json").read_text())["kind"] == "import"
        with pytest.raises(CimisError, match="already running"):
            flow.import_model(tmp_path / "bundle")
        [status] = kit.wait(flow)
        assert status.state == "done", status.message
        registry = Registry.open(tmp_path / "registry")
        assert registry.active_version() == "v0001"  # the first version of a new registry is the active one
        assert [c["name"] for c in registry.card("v0001")["classes"]] == ["spleen"]
        assert flow.outcome.version == "v0001" and "spleen" in flow.outcome.message
        assert [v.name for v in flow.versions()] == ["v0001"]

        archive = flow.export_version("v0001", tmp_path / "v0001.tar.gz")
        assert flow.import_model(archive) == "v0002" and not flow.busy  # the quick path: no job
        assert registry.active_version() == "v0001" and [v.name for v in flow.versions()] == ["v0001", "v0002"]

        bad = write_bundle(tmp_path / "bad-bundle")
        (bad / "models" / "model.pt").write_bytes(b"not a checkpoint")
        flow.import_model(bad, settings=kit.tiny_settings())
        [status] = kit.wait(flow)
        assert status.state == "error" and "model.pt" in status.message and flow.outcome.message == status.message
        assert [v.name for v in flow.versions()] == ["v0001", "v0002"] and registry.active_version() == "v0001"
    finally:
        flow.shutdown()
