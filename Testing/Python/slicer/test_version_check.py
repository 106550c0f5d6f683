"""A check before a new version goes live: a Learn job scores the new version (new organs' Dice on the
volumes marked for validation, old organs' agreement between old and new version) and leaves it inactive;
the scores are in the registry's summary, per organ with a flag, and Activate is an explicit step. Also
Resume of a cancelled Learn, and a first model trained in an empty registry."""

from __future__ import annotations

import time

import pytest

from cimis.errors import CimisError
from cimis.registry import Registry
from cimis_slicer.segments import add_new_structures, paint_segment, segments_of
from cimis_slicer.version_scores import VersionScores
from cimis_slicer.volume_files import read_volume
from cimis_slicer.workflow import LearnCase, Workflow


def _painted(kit, context, volume, labels, names_values, known):
    node = add_new_structures(context, volume, [n for n, _ in names_values], known)
    for segment, (_, value) in zip(segments_of(node), names_values):
        paint_segment(context, node, segment.id, labels == value, volume)
    return node


def test_cancelled_learn_resumes_and_its_version_waits_with_scores(kit, context, ct, phantom_files, registry_copy,
                                                                    tmp_path):
    labels, stomach = phantom_files["labels"], phantom_files["classes"].by_name(kit.NEW_CLASS).value
    second_ct = read_volume(context.scene, phantom_files["ct"], "CT validation")
    flow = Workflow(context, registry_copy, tmp_path / "jobs",
                    env={**kit.WORKER_ENV, "CIMIS_WORKER_PAUSE_AT": "checkpoint"})
    try:
        known = flow.model_classes()
        cases = [LearnCase(ct, _painted(kit, context, ct, labels, [(kit.NEW_CLASS, stomach)], known)),
                 LearnCase(second_ct, _painted(kit, context, second_ct, labels, [(kit.NEW_CLASS, stomach)], known),
                           validation=True)]
        settings = kit.tiny_settings()
        settings.iterations = 2
        flow.learn(cases, settings)
        while not any(e.get("event") == "paused" for e in (flow.task.process.events if flow.task else [])):
            assert flow.busy, "the learn job ended before its first checkpoint"
            flow.poll()
            time.sleep(0.1)
        flow.cancel()
        [status] = kit.wait(flow, timeout_s=60)
        assert status.state == "cancelled" and flow.can_resume

        flow.env = kit.WORKER_ENV
        flow.resume()
        process = flow.task.process
        [status] = kit.wait(flow)
        assert status.state == "done", status.message
        assert process.events[0]["resume"] is True
        assert any(e.get("event") == "check" for e in process.events)

        registry = Registry.open(registry_copy)
        # Published, scored, and NOT live: the clinician looks first.
        assert registry.version_names() == ["v0001", "v0002"] and registry.active_version() == "v0001"
        check = registry.summary("v0002")["check"]
        assert check["volumes"] == 2 and check["validation_volumes"] == 1
        assert check["new_organs"][kit.NEW_CLASS]["volumes"] == 1
        assert 0.0 <= check["new_organs"][kit.NEW_CLASS]["dice"] <= 1.0
        assert set(check["old_organs"]) == set(kit.BASE_CLASSES)
        assert all(entry["volumes"] == 2 for entry in check["old_organs"].values())

        scores = flow.outcome.scores
        assert flow.outcome.awaiting_activation and scores == VersionScores.of_version(registry, "v0002")
        for organ in scores.organs:
            assert organ.flagged == (not organ.new and organ.score is not None and organ.score < scores.threshold)
        assert "v0002" in flow.outcome.message and "Activate" in flow.outcome.message
        assert flow.activate("v0002") == "v0002" and not flow.outcome.awaiting_activation
        assert registry.active_version() == "v0002"
    finally:
        flow.shutdown()


def test_scores_flag_old_organs_below_the_threshold_and_the_question_names_them():
    scores = VersionScores.from_check({
        "new_organs": {"pancreas": {"dice": 0.71, "volumes": 1}, "gallbladder": {"dice": None, "volumes": 0}},
        "old_organs": {"liver": {"agreement": 0.95, "volumes": 2}, "spleen": {"agreement": 0.42, "volumes": 2},
                       "aorta": {"agreement": None, "volumes": 2}}}, threshold=0.8)
    assert [o.name for o in scores.flagged] == ["spleen"]
    assert scores.rows()[0] == ("pancreas (new)", "Dice", "0.71", False)
    assert ("gallbladder (new)", "Dice", "no validation volume", False) in scores.rows()
    assert ("aorta", "agreement", "not found in the volumes", False) in scores.rows()
    assert "spleen 0.42" in scores.summary() and "pancreas Dice 0.71" in scores.summary()
    assert "spleen (0.42)" in scores.activation_question("v0007")
    calm = VersionScores.from_check({"old_organs": {"liver": {"agreement": 0.9, "volumes": 1}}})
    assert calm.activation_question("v0002") is None and "every old organ agrees" in calm.summary()


def test_an_empty_registry_gets_a_first_model_from_painted_volumes(kit, context, ct, phantom_files, tmp_path):
    flow = Workflow(context, tmp_path / "new-registry", tmp_path / "jobs", env=kit.WORKER_ENV)
    try:
        assert flow.registry_is_empty()
        labels, classes = phantom_files["labels"], phantom_files["classes"]
        organs = [(name, classes.by_name(name).value) for name in ("liver", "spleen")]
        from cimis.data.classes import ClassSet

        painted = _painted(kit, context, ct, labels, organs, ClassSet([]))
        with pytest.raises(CimisError, match="no volume"):
            flow.train_first_model([LearnCase(None, painted)], kit.tiny_settings())
        flow.train_first_model([LearnCase(ct, painted)], kit.tiny_settings(), network=kit.TINY_NETWORK,
                               preprocess=kit.TINY_PREPROCESS)
        [status] = kit.wait(flow)
        assert status.state == "done", status.message
        registry = Registry.open(tmp_path / "new-registry")
        assert registry.active_version() == "v0001" and not flow.registry_is_empty()
        assert [c["name"] for c in registry.card("v0001")["classes"]] == ["liver", "spleen"]
        with pytest.raises(CimisError, match="already holds model versions"):
            flow.train_first_model([LearnCase(ct, painted)], kit.tiny_settings())
    finally:
        flow.shutdown()
