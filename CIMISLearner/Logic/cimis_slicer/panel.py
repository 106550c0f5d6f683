"""The module panel's state without Qt: which buttons can be pressed and what the status line says.

The widget copies its selectors into a :class:`PanelInputs`, calls :func:`panel_view` and applies the
result; every rule about what can be done when lives here, where it is tested.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PanelInputs:
    registry_ok: bool = False  # a registry with an active version is chosen
    registry_message: str = ""  # why not, if not
    volume_selected: bool = False
    segmentation_selected: bool = False
    new_structure_names: str = ""  # the text field for Add new structures
    job_running: bool = False
    job_kind: str = ""
    job_status: str = ""  # the running job's one-line description
    last_message: str = ""  # the last finished job's outcome, or the last refusal
    last_failed: bool = False
    version_selected: bool = False  # a version in the list other than the active one
    any_version_selected: bool = False  # any version in the list (export)
    registry_empty: bool = False  # a chosen folder without a model yet: Import or Train a first model
    awaiting_activation: bool = False  # a learned version waits for the clinician's look at its scores
    can_resume: bool = False  # the last Learn was cancelled and can continue from its checkpoint


@dataclass(frozen=True)
class PanelView:
    segment_enabled: bool
    add_structures_enabled: bool
    learn_enabled: bool
    cancel_enabled: bool
    activate_enabled: bool
    settings_enabled: bool
    status: str
    status_is_error: bool
    registry_change_enabled: bool = True  # never while a job runs: the job belongs to its registry
    import_enabled: bool = False
    train_first_enabled: bool = False
    activate_learned_enabled: bool = False
    resume_enabled: bool = False
    export_enabled: bool = False
    delete_enabled: bool = False


def panel_view(inputs: PanelInputs) -> PanelView:
    """Buttons reflect what can be done now; the status says what to do next or what went wrong."""
    idle = not inputs.job_running
    ready = idle and inputs.registry_ok and inputs.volume_selected
    if inputs.job_running:
        status, error = f"{inputs.job_kind}: {inputs.job_status}".strip(": "), False
    elif inputs.last_message:
        status, error = inputs.last_message, inputs.last_failed
    elif inputs.registry_empty:
        status, error = ("This registry has no model yet: Import a model file, or paint organs on a CT and press "
                         "Train a first model."), False
    elif not inputs.registry_ok:
        status, error = inputs.registry_message or "Choose a model registry (a folder of model versions).", False
    elif not inputs.volume_selected:
        status, error = "Choose the CT volume to work on.", False
    elif not inputs.segmentation_selected:
        status, error = "Press Segment to see what the model knows, or name new structures and add them.", False
    else:
        status, error = "Paint the new structures in the Segment Editor, then press Learn.", False
    return PanelView(
        segment_enabled=ready,
        add_structures_enabled=ready and bool(inputs.new_structure_names.strip()),
        learn_enabled=ready and inputs.segmentation_selected,
        cancel_enabled=inputs.job_running,
        activate_enabled=idle and inputs.registry_ok and inputs.version_selected,
        settings_enabled=idle,
        status=status,
        status_is_error=error,
        registry_change_enabled=idle,
        import_enabled=idle and (inputs.registry_ok or inputs.registry_empty),
        train_first_enabled=idle and inputs.registry_empty and inputs.volume_selected and inputs.segmentation_selected,
        activate_learned_enabled=idle and inputs.awaiting_activation,
        resume_enabled=idle and inputs.can_resume,
        export_enabled=idle and inputs.registry_ok and inputs.any_version_selected,
        delete_enabled=idle and inputs.registry_ok and inputs.version_selected,
    )


def parse_structure_names(text: str) -> list[str]:
    """``"pancreas, right adrenal gland"`` -> the names, in order, blanks dropped."""
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]
