"""Jobs cannot outlive their owner. Inside Slicer the worker runs behind PythonSlicer, a launcher whose child
is the real Python; here a launcher-like parent process (a Python script that starts the worker as its child
and waits, as PythonSlicer does) stands in for it."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from cimis.registry import Registry
from cimis.worker import process_alive
from cimis_slicer.segments import add_new_structures, paint_segment, segments_of
from cimis_slicer.workflow import LearnCase, Workflow

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the launcher stand-in is a POSIX script")


@pytest.fixture
def launcher(tmp_path):
    script = tmp_path / "PythonLauncher"
    script.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                      f"sys.exit(subprocess.call([{sys.executable!r}] + sys.argv[1:]))\n")
    script.chmod(0o755)
    return script


def _wait_for_event(workflow: Workflow, name: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workflow.poll()
        events = workflow.task.process.events if workflow.task else []
        found = [e for e in events if e.get("event") == name]
        if found:
            return found[0]
        assert workflow.busy, f"the job ended before {name!r}"
        time.sleep(0.1)
    raise AssertionError(f"no {name!r} event within {timeout_s} s")


def _wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.1)
    return False


def _started_worker(kit, context, ct, phantom_files, registry, tmp_path, launcher, pause_at, learn):
    flow = Workflow(context, registry, tmp_path / "jobs", python=str(launcher),
                    env={**kit.WORKER_ENV, "CIMIS_WORKER_PAUSE_AT": pause_at})
    if learn:
        painted = add_new_structures(context, ct, [kit.NEW_CLASS], flow.model_classes())
        paint_segment(context, painted, segments_of(painted)[0].id, phantom_files["labels"] == 7, ct)
        flow.learn([LearnCase(ct, painted)], kit.tiny_settings(), resegment=False)
    else:
        flow.segment([ct], kit.tiny_settings())
    worker_pid = _wait_for_event(flow, "started")["pid"]
    _wait_for_event(flow, "paused")
    launcher_pid = flow.task.process.process.pid
    assert worker_pid != launcher_pid and process_alive(worker_pid)
    return flow, launcher_pid, worker_pid


def test_worker_whose_launcher_is_killed_cancels_itself_and_publishes_nothing(kit, context, ct, phantom_files,
                                                                              registry_copy, tmp_path, launcher):
    # Paused just before the new version would be staged for publishing: the worst moment to be orphaned.
    flow, launcher_pid, worker_pid = _started_worker(kit, context, ct, phantom_files, registry_copy, tmp_path,
                                                     launcher, "publish:staged", learn=True)
    process = flow.task.process
    try:
        os.kill(launcher_pid, signal.SIGKILL)  # Slicer's launcher dies; nobody tells the real Python
        assert _wait_until_gone(worker_pid, 20.0), "the worker kept running after its parent was gone"
        registry = Registry.open(registry_copy)
        assert registry.version_names() == ["v0001"] and registry.active_version() == "v0001"
        assert [s.state for s in kit.wait(flow, timeout_s=30)] == ["cancelled"]
        [cancelled] = [e for e in process.events if e.get("event") == "cancelled"]
        assert cancelled["reason"] == "parent process gone"
    finally:
        if process_alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
        flow.shutdown()


@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_closing_slicer_ends_the_real_python_behind_the_launcher(kit, context, ct, phantom_files, registry_copy,
                                                                 tmp_path, launcher, how):
    flow, launcher_pid, worker_pid = _started_worker(kit, context, ct, phantom_files, registry_copy, tmp_path,
                                                     launcher, "stage:checking", learn=False)
    process = flow.task.process
    try:
        started = time.monotonic()
        if how == "shutdown":
            flow.shutdown()  # the cancel file first, then the process tree
        else:
            process.kill()  # the process tree at once
        assert _wait_until_gone(worker_pid, 2.0), "the worker outlived the launcher"
        assert not process_alive(launcher_pid)
        assert time.monotonic() - started < 15
    finally:
        if process_alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
