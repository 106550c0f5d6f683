"""The clinician's round on Slicer's real classes: a CT in the scene -> Segment -> new structure painted ->
Learn (a tiny job in the real worker subprocess) -> the new version active and the CT segmented again, old
and new segments on the CT's own grid. And the failures: each ends in one clear sentence, scene untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.errors import CimisError
from cimis.registry import Registry
from cimis_slicer import NEW_CLASS_TAG, NEW_STRUCTURE_TAG
from cimis_slicer.segments import (add_new_structures, export_label_array, paint_segment, reference_geometry,
                                   segment_tag, segments_of)
from cimis_slicer.volumes import geometry_of
from cimis_slicer.workflow import LearnCase


def test_full_round_segment_paint_learn_resegment(kit, context, registry_copy, tmp_path):
    from cimis_slicer.round_trip import run_round

    result = run_round(context, tmp_path / "round", registry_copy, keep_job_folders=True)  # to read what was sent
    ct, geometry = result.volume, geometry_of(result.volume)
    assert geometry.spacing == pytest.approx((10.0, 10.0, 10.0))

    # Segment: one segment per class of the base model, named and coloured from its card.
    v1_classes = {c["name"]: tuple(c["color"]) for c in Registry(registry_copy).card("v0001")["classes"]}
    assert {(s.name, s.color) for s in segments_of(result.first)} == set(v1_classes.items())
    assert result.first.GetAttribute("CIMISLearner.Version") == "v0001"

    # Add new structures made a tagged segment; Learn sent only it, with a label value the model does not use.
    [new] = segments_of(result.painted)
    assert segment_tag(result.painted, new.id, NEW_STRUCTURE_TAG) == "true"
    job = json.loads((result.learn_job / "job.json").read_text())
    assert [c["name"] for c in job["data"]["classes"]] == [kit.NEW_CLASS]
    assert job["data"]["classes"][0]["value"] not in [c["value"] for c in Registry(registry_copy).card("v0001")["classes"]]
    sent = sitk.GetArrayFromImage(sitk.ReadImage(job["data"]["cases"][0]["label"]))
    assert np.array_equal(sent > 0, result.painted_mask)
    assert [s.result["kind"] for s in result.statuses] == ["learn", "segment"]
    assert Registry(registry_copy).active_version() == "v0002"
    # Before activation the panel had the new version's scores: every old organ's agreement, the new organ.
    rows = {name: (measure, flagged) for name, measure, _, flagged in result.scores.rows()}
    assert set(rows) == set(kit.BASE_CLASSES) | {f"{kit.NEW_CLASS} (new)"}
    assert rows[f"{kit.NEW_CLASS} (new)"][0] == "Dice" and rows["liver"][0] == "agreement"

    # The CT segmented again with v0002: old and new classes, the new one marked, on the CT's own grid.
    names = {s.name: s.id for s in segments_of(result.second)}
    assert set(names) == set(kit.BASE_CLASSES) | {kit.NEW_CLASS}
    assert segment_tag(result.second, names[kit.NEW_CLASS], NEW_CLASS_TAG) == "true"
    assert segment_tag(result.second, names["liver"], NEW_CLASS_TAG) == "false"
    assert result.second.GetAttribute("CIMISLearner.Version") == "v0002"
    assert result.second.GetName() == f"CT segmentation v0002 (new: {kit.NEW_CLASS})"  # visible in node lists
    assert reference_geometry(result.second).same_grid(geometry)
    assert export_label_array(context, result.second, list(names.values()), ct).shape == geometry.shape
    # Nothing was replaced: the first result and the painted segmentation are still there, unchanged.
    assert context.scene.GetNodeByID(result.first.GetID()) is result.first
    assert {s.name for s in segments_of(result.first)} == set(v1_classes)
    assert kit.painted_in(result.painted, new.id) == int(result.painted_mask.sum())


def test_worker_error_reaches_the_caller_and_scene_is_untouched(kit, context, ct, phantom_files, workflow,
                                                                 registry_copy):
    painted = add_new_structures(context, ct, [kit.NEW_CLASS], workflow.model_classes())
    [new] = segments_of(painted)
    paint_segment(context, painted, new.id, phantom_files["labels"] == 7, ct)
    # Damage the active version's weights after the bridge's own checks would pass: only the worker notices.
    weights = registry_copy / "versions" / "v0001" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    before = kit.scene_snapshot(context.scene)

    workflow.learn([LearnCase(ct, painted)], kit.tiny_settings())
    [status] = kit.wait(workflow)

    assert status.state == "error"
    assert "v0001" in status.message and "\n" not in status.message
    assert workflow.outcome.message == status.message
    assert kit.scene_snapshot(context.scene) == before
    assert Registry(registry_copy).version_names() == ["v0001"]


def test_cancel_stops_the_job_and_keeps_the_scene(kit, context, ct, workflow, registry_copy):
    before = kit.scene_snapshot(context.scene)
    workflow.segment([ct], kit.tiny_settings())
    workflow.cancel()
    [status] = kit.wait(workflow)
    assert status.state in ("cancelled", "done")  # a tiny job may finish before it sees the cancel file
    if status.state == "cancelled":
        assert kit.scene_snapshot(context.scene) == before


@pytest.mark.parametrize("problem", ["no volume", "no segmentation", "nothing painted", "only known organs",
                                     "other grid", "no registry"])
def test_bad_input_is_one_sentence_and_changes_nothing(kit, context, ct, workflow, tmp_path, problem):
    from cimis_slicer.volumes import add_volume_from_array

    painted = add_new_structures(context, ct, [kit.NEW_CLASS], workflow.model_classes())
    cases = [LearnCase(ct, painted)]
    if problem == "no volume":
        cases = [LearnCase(None, painted)]
    elif problem == "no segmentation":
        cases = [LearnCase(ct, None)]
    elif problem == "only known organs":
        painted.GetSegmentation().GetNthSegment(0).SetName("Liver")
    elif problem == "other grid":
        other = add_volume_from_array(context.scene, np.zeros((10, 12, 14), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]),
                                      "other")
        cases = [LearnCase(other, painted)]
    elif problem == "no registry":
        workflow.registry_path = tmp_path / "missing"
    before = kit.scene_snapshot(context.scene)
    jobs_before = sorted(workflow.jobs_dir.glob("*")) if workflow.jobs_dir.exists() else []

    with pytest.raises(CimisError) as caught:
        workflow.learn(cases, kit.tiny_settings())

    expected = {"no volume": "no volume is selected", "no segmentation": "no segmentation",
                "nothing painted": "no new structure is painted", "only known organs": "has no new structure",
                "other grid": "different grid", "no registry": "no model registry"}[problem]
    assert expected in caught.value.message
    assert "\n" not in caught.value.one_line()
    assert kit.scene_snapshot(context.scene) == before
    assert (sorted(workflow.jobs_dir.glob("*")) if workflow.jobs_dir.exists() else []) == jobs_before
    assert not workflow.busy
