"""One job, owned, and no patient data left behind: the registry cannot be switched under a running job, a
bug in a completion handler still ends in the status line, a job folder shrinks to its logs once its result
is in the scene, a cancelled job's folder goes when the next job starts, and every folder goes when Slicer
closes (test_job_folders.py has the rest of the rule)."""

from __future__ import annotations

import json

import pytest

from cimis.errors import CimisError
from cimis_slicer.workflow import Workflow


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_one_owned_job_leaves_only_its_logs(kit, ct, workflow, registry_copy, tmp_path):
    torch = pytest.importorskip("torch")
    settings = kit.tiny_settings()
    settings.device = "auto"  # on a machine without a GPU the worker warns, and the log panel shows it
    folder = workflow.segment([ct], settings)
    # The CT was written for the worker without compression: quick on the GUI thread.
    [image] = (folder / "inputs").glob("*.nrrd")
    assert "encoding: raw" in image.read_bytes()[:1000].split(b"\n\n")[0].decode()
    # The registry cannot be switched under the running job: it would be left without result, Cancel or clean-up.
    with pytest.raises(CimisError, match="a job is running"):
        workflow.registry_path = tmp_path / "another"
    assert workflow.registry_path == registry_copy and workflow.busy
    [status] = kit.wait(workflow)
    assert status.state == "done" and workflow.outcome.segmentations  # its result still arrived

    # Once the result is in the scene, the folder keeps only its event log, result and worker log.
    assert sorted(p.name for p in folder.rglob("*")) == ["events.jsonl", "owner.pid", "result.json",
                                                         "worker-stderr.log"]
    assert _folder_bytes(folder) < 64 * 1024
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "started" and events[-1]["event"] == "done"
    if not torch.cuda.is_available():
        assert "device: cpu" in workflow.log
        assert any(line.startswith("warning: no CUDA GPU") for line in workflow.log)
    assert workflow.log[-1].startswith("done")

    workflow.registry_path = tmp_path / "another"  # idle: allowed
    assert workflow.registry_path == tmp_path / "another"

    # Slicer closes: the logs go too (they name the volumes; nothing reads them in a later session).
    workflow.shutdown()
    assert list(workflow.jobs_dir.iterdir()) == []


def test_cancelled_job_folder_goes_at_the_next_start_and_handler_bugs_reach_the_status(kit, context, ct,
                                                                                        registry_copy, tmp_path):
    # (keep_job_folders=True keeps them: test_workflow's full round reads its learn job's folder afterwards.)
    flow = Workflow(context, registry_copy, tmp_path / "jobs",
                    env={**kit.WORKER_ENV, "CIMIS_WORKER_PAUSE_AT": "stage:segmenting"})
    try:
        first = flow.segment([ct], kit.tiny_settings())
        flow.cancel()
        [status] = kit.wait(flow, timeout_s=60)
        assert status.state == "cancelled"
        assert (first / "inputs").is_dir()  # kept until the next start (Resume, a look at the log)
        flow.env = kit.WORKER_ENV
        flow.segment([ct], kit.tiny_settings())
        assert not first.exists()

        def buggy(result):  # stands in for an unexpected error while the result is imported
            raise KeyError("no-such-case")

        flow.task.on_done = buggy
        [status] = kit.wait(flow)  # the widget timer's poll must not raise
        assert status.state == "error" and not flow.busy
        assert "KeyError" in status.message and "bug" in status.message and "\n" not in status.message
        assert flow.outcome.message == status.message
        assert flow.task is None and any(flow.jobs_dir.iterdir())  # the failed job's folder, for a look
        flow.shutdown()
        assert list(flow.jobs_dir.iterdir()) == []
    finally:
        flow.shutdown()
