"""The panel's rules (which buttons, which message), without Qt. The first-use install plan: test_first_use.py."""

from __future__ import annotations

from cimis_slicer.panel import PanelInputs, panel_view, parse_structure_names
from cimis_slicer.worker_process import JobStatus, format_duration


def test_nothing_chosen_only_asks_for_a_registry():
    view = panel_view(PanelInputs())
    assert not (view.segment_enabled or view.learn_enabled or view.add_structures_enabled or view.cancel_enabled)
    assert "registry" in view.status


def test_no_volume_disables_segment_and_learn_and_says_so():
    view = panel_view(PanelInputs(registry_ok=True, segmentation_selected=True))
    assert not view.segment_enabled and not view.learn_enabled
    assert "volume" in view.status


def test_ready_to_learn_and_add_structures():
    view = panel_view(PanelInputs(registry_ok=True, volume_selected=True, segmentation_selected=True,
                                  new_structure_names="pancreas"))
    assert view.segment_enabled and view.learn_enabled and view.add_structures_enabled and not view.cancel_enabled
    assert panel_view(PanelInputs(registry_ok=True, volume_selected=True)).learn_enabled is False


def test_running_job_allows_only_cancel_and_shows_progress():
    status = JobStatus(stage="training", iteration=12, total=300, loss=0.8123, eta_s=754, device="cpu")
    view = panel_view(PanelInputs(registry_ok=True, volume_selected=True, segmentation_selected=True,
                                  job_running=True, job_kind="learn", job_status=status.describe(),
                                  version_selected=True))
    assert view.cancel_enabled and not (view.segment_enabled or view.learn_enabled or view.activate_enabled)
    assert not view.settings_enabled
    assert view.status == "learn: training 12/300, loss 0.812, about 12 min 34 s left (cpu)"


def test_worker_error_is_shown_as_an_error():
    view = panel_view(PanelInputs(registry_ok=True, volume_selected=True, last_message="boom (fix it)",
                                  last_failed=True))
    assert view.status == "boom (fix it)" and view.status_is_error and view.segment_enabled


def test_structure_names_and_durations():
    assert parse_structure_names(" pancreas, right adrenal gland;; ,") == ["pancreas", "right adrenal gland"]
    assert [format_duration(s) for s in (5, 65, 7300)] == ["5 s", "1 min 05 s", "2 h 01 min"]


def test_empty_registry_offers_import_and_a_first_model():
    view = panel_view(PanelInputs(registry_empty=True, volume_selected=True))
    assert view.import_enabled and not view.train_first_enabled and not view.segment_enabled
    assert "Import" in view.status and "Train a first model" in view.status
    view = panel_view(PanelInputs(registry_empty=True, volume_selected=True, segmentation_selected=True))
    assert view.train_first_enabled and not view.learn_enabled


def test_a_running_job_locks_the_registry_and_the_versions():
    view = panel_view(PanelInputs(registry_ok=True, job_running=True, job_kind="learn", version_selected=True,
                                  any_version_selected=True, awaiting_activation=True, can_resume=True))
    assert not (view.registry_change_enabled or view.import_enabled or view.export_enabled or view.delete_enabled
                or view.activate_learned_enabled or view.resume_enabled)


def test_learned_version_waits_for_activate_and_a_cancelled_learn_for_resume():
    view = panel_view(PanelInputs(registry_ok=True, volume_selected=True, awaiting_activation=True, can_resume=True,
                                  any_version_selected=True))
    assert view.activate_learned_enabled and view.resume_enabled and view.export_enabled
    assert not view.delete_enabled  # the active version is selected: the registry refuses to delete it
