"""Job folders hold copies of the patient's images: owner-only, gone when a job cannot start, gone when the next
job starts or Slicer closes (this session's and a crashed session's alike, never another running Slicer's or
anything that is not a job folder), and a result never lands in a scene other than the one it came from."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from cimis.errors import CimisError
from cimis_slicer.segments import add_new_structures, paint_segment, segments_of
from cimis_slicer.volume_files import read_volume
from cimis_slicer.volumes import add_volume_from_array, geometry_of
from cimis_slicer.workflow import LearnCase, Workflow

posix_only = pytest.mark.skipif(os.name != "posix", reason="file size limits and mode bits are POSIX")


@pytest.fixture
def small_disk():
    """Files larger than 200 kB cannot be written (as on a full disk): the write fails with EFBIG."""
    resource = pytest.importorskip("resource")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


@posix_only
@pytest.mark.parametrize("job", ["segment", "learn"])
def test_a_job_whose_inputs_cannot_all_be_written_leaves_no_folder(kit, context, ct, phantom_files, workflow,
                                                                    job, request):
    # A second CT of 512 kB: the first CT (58 kB) and its label map are written, then the disk is "full".
    big = add_volume_from_array(context.scene, np.ones((64, 64, 64), np.int16), geometry_of(ct).ijk_to_ras, "CT2")
    cases = []
    for volume in (ct, big):
        painted = add_new_structures(context, volume, [kit.NEW_CLASS], workflow.model_classes())
        paint_segment(context, painted, segments_of(painted)[0].id, np.ones(geometry_of(volume).shape, bool), volume)
        cases.append(LearnCase(volume, painted))
    before = kit.scene_snapshot(context.scene)
    request.getfixturevalue("small_disk")

    with pytest.raises(CimisError) as caught:
        if job == "segment":
            workflow.segment([ct, big], kit.tiny_settings())
        else:
            workflow.learn(cases, kit.tiny_settings())

    assert "'CT2'" in caught.value.message and "\n" not in caught.value.one_line()
    assert list(workflow.jobs_dir.iterdir()) == []  # not the first CT's copy, not an empty folder
    assert stat.S_IMODE(workflow.jobs_dir.stat().st_mode) == 0o700  # made by the workflow: owner-only
    assert kit.scene_snapshot(context.scene) == before and not workflow.busy


def _job_folder(jobs, name: str, owner_pid: int | None, files: tuple[str, ...]):
    folder = jobs / name
    (folder / "inputs").mkdir(parents=True)
    if owner_pid is not None:
        (folder / "owner.pid").write_text(str(owner_pid))
    for file in files:
        (folder / file).write_text("{}")
    return folder


@posix_only
def test_job_folders_are_owner_only_and_go_at_open_at_the_next_start_and_at_shutdown(kit, context, ct,
                                                                                    registry_copy, tmp_path):
    jobs = tmp_path / "jobs"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = int(ended.stdout)  # a Slicer that is gone
    # What earlier sessions left: a crashed job (images, job.json), a finished one's logs, an old failed export.
    old = [_job_folder(jobs, "learn-20240101-101010-0a1b2c", crashed, ("job.json",)),
           _job_folder(jobs, "segment-20240101-101011-0a1b2d", crashed, ("events.jsonl", "result.json")),
           _job_folder(jobs, "train-20240101-101012-0a1b2e", None, ("job.json",))]
    # Kept: another running Slicer's job (our parent process stands in for it), and what is not a job folder.
    others = [_job_folder(jobs, "segment-20240101-101013-0a1b2f", os.getppid(), ("job.json",)),
              _job_folder(jobs, "my-notes", crashed, ("job.json",)),
              _job_folder(jobs, "segment-20240101-101014-0a1b30", None, ("events.jsonl",))]
    (jobs / "readme.txt").write_text("not ours")

    flow = Workflow(context, registry_copy, jobs, env={**kit.WORKER_ENV, "CIMIS_WORKER_PAUSE_AT": "stage:checking"})
    try:
        # The module opens: what earlier sessions left goes at once, not at the first job, which may never come.
        assert not any(f.exists() for f in old)
        assert all(f.is_dir() for f in others) and (jobs / "readme.txt").is_file()
        late = _job_folder(jobs, "learn-20240101-101015-0a1b31", crashed, ("job.json",))  # left since then
        folder = flow.segment([ct], kit.tiny_settings())
        assert not late.exists()
        assert all(f.is_dir() for f in others) and (jobs / "readme.txt").is_file()
        # Owner-only: the copy of the CT inside cannot be read by another user of the temporary folder.
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert any((folder / "inputs").glob("*.nrrd"))
    finally:
        flow.shutdown()  # Slicer closes during the job
    assert not folder.exists()
    assert all(f.is_dir() for f in others) and (jobs / "readme.txt").is_file()


def test_a_result_never_lands_in_another_scene(kit, context, ct, phantom_files, workflow):
    workflow.segment([ct], kit.tiny_settings())
    context.scene.Clear(0)  # File > Close Scene while the job runs, then the next patient is loaded
    read_volume(context.scene, phantom_files["ct"], "next patient")
    before = kit.scene_snapshot(context.scene)

    [status] = kit.wait(workflow)

    assert status.state == "error"
    assert status.message.startswith("the scene this job segmented was closed; its result was not loaded")
    assert kit.scene_snapshot(context.scene) == before and not workflow.outcome.segmentations


def test_closing_the_scene_cancels_a_running_segment(kit, context, ct, registry_copy, tmp_path):
    flow = Workflow(context, registry_copy, tmp_path / "jobs",
                    env={**kit.WORKER_ENV, "CIMIS_WORKER_PAUSE_AT": "stage:segmenting"})
    try:
        flow.scene_closing()  # idle: nothing to do
        flow.segment([ct], kit.tiny_settings())
        flow.scene_closing()
        assert [s.state for s in kit.wait(flow, timeout_s=60)] == ["cancelled"]
    finally:
        flow.shutdown()
