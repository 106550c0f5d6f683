"""`cimis worker` as a real subprocess on tiny phantoms: the event stream of train, learn and segment jobs,
cancel, kill -9 at several points with --resume, every bad input of the issue, and a pickle that is refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.registry import Registry

PROGRESS_FIELDS = {"iteration", "total", "loss", "eta_s", "device", "memory_mb"}


def assert_protocol(events: list[dict], job_id: str | None) -> None:
    """Every event carries the protocol header; seq counts up; started first, one terminal event last."""
    assert events, "no events"
    for i, event in enumerate(events, start=1):
        assert event["protocol"] == 1 and event["seq"] == i and isinstance(event["time"], str)
        assert event["job"] == (None if i == 1 else job_id) or event["event"] == "error"
    assert events[0]["event"] == "started"
    terminal = [e for e in events if e["event"] in ("done", "error", "cancelled")]
    assert len(terminal) == 1 and terminal[0] is events[-1]


def load_every_version(registry: Path) -> list[str]:
    """Load every published version completely (checksums, safetensors, network shapes, prototypes)."""
    reg = Registry.open(registry)
    names = reg.version_names()
    for name in names:
        net, card, prototypes = reg.load(name)
        assert net.num_channels == card.classes.num_channels and prototypes is not None
    return names


# ------------------------------------------------------------------------------------ full streams
def test_train_job_event_stream(base_run):
    registry, events, code, stderr = base_run
    assert code == 0
    assert_protocol(events, "base")
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["started", "stage"] and events[1]["stage"] == "checking"
    # No GPU here: the worker says it runs on the CPU, then reports the device.
    warning = next(e for e in events if e["event"] == "warning")
    assert warning["code"] == "no_gpu" and "CPU" in warning["message"]
    device = next(e for e in events if e["event"] == "device")
    assert device["device"] == "cpu" and device["requested"] == "auto" and device["threads"] == 1
    progress = [e for e in events if e["event"] == "progress"]
    assert [p["iteration"] for p in progress] == [1, 2]
    assert all(PROGRESS_FIELDS <= set(p) and p["total"] == 2 and p["device"] == "cpu" for p in progress)
    assert [e["iteration"] for e in events if e["event"] == "checkpoint"] == [1]
    metric = next(e for e in events if e["event"] == "metric")
    assert set(metric["dice"]) == {"spleen", "liver", "aorta", "left kidney"}
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["checking", "training", "saving", "publishing"]
    done = events[-1]
    assert done["event"] == "done" and done["version"] == "v0001" and done["active"] is True
    assert Path(done["model"]) == registry / "versions" / "v0001"
    assert load_every_version(registry) == ["v0001"]
    assert Registry.open(registry).active_version() == "v0001"


def test_learn_job_event_stream_and_new_active_version(learned_run, base_run):
    registry, events, code, _ = learned_run
    assert code == 0
    assert_protocol(events, "add-kidney")
    done = events[-1]
    assert done["version"] == "v0002" and done["base_version"] == "v0001" and done["active"]
    assert done["new_classes"] == ["right kidney", "stomach"]
    assert done["classes"] == ["spleen", "left kidney", "liver", "aorta", "right kidney", "stomach"]
    assert "warning" not in [e["event"] for e in events]  # device "cpu" was asked for: nothing to warn about
    assert [e["iteration"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4]
    reg = Registry.open(registry)
    assert reg.active_version() == "v0002" and load_every_version(registry) == ["v0001", "v0002"]
    summary = reg.summary("v0002")
    assert summary["kind"] == "learn" and summary["base_version"] == "v0001" and summary["job"]["id"] == "add-kidney"
    assert summary["note"] == "right kidney and stomach"
    # The earlier version is untouched, byte for byte.
    assert (registry / "versions" / "v0001" / "weights.safetensors").read_bytes() == \
        (base_run[0] / "versions" / "v0001" / "weights.safetensors").read_bytes()


def test_segment_job_writes_label_maps_on_the_input_grid(kit, dataset, learned_run, tmp_path):
    registry = kit.copy_registry(learned_run[0], tmp_path / "registry")
    job_file = kit.write_job(tmp_path / "seg.json", kit.segment_job(dataset, registry, tmp_path / "out"))
    code, events, stderr = kit.run_worker(job_file)
    assert code == 0, stderr[-3000:]
    assert_protocol(events, "seg")
    progress = [e for e in events if e["event"] == "progress"]
    assert [(p["iteration"], p["total"], p["id"]) for p in progress] == [(1, 2, "phantom_002"), (2, 2, "second")]
    done = events[-1]
    assert done["version"] == "v0002"
    allowed = {0, 1, 2, 3, 6, 7, 8}  # background and the six classes' values
    for output, source in zip(done["outputs"], (kit.image_of(dataset, 2), kit.image_of(dataset, 1))):
        label, image = sitk.ReadImage(output["label"]), sitk.ReadImage(str(source))
        assert Path(output["label"]).parent == tmp_path / "out" / "labels"
        assert label.GetSize() == image.GetSize()
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin())
        np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(label))) <= allowed
        assert set(output["volumes_ml"]) == set(done["classes"])
    assert json.loads((tmp_path / "out" / "result.json").read_text())["outputs"][0]["id"] == "phantom_002"


def test_a_job_writes_only_into_its_output_folder_and_the_registry(kit, dataset, base_registry, tmp_path):
    """Everything else stays as it was: the inputs, the working directory, HOME and the temp folder."""
    home, temp, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for folder in (home, temp, cwd):
        folder.mkdir()
    before = kit.tree_snapshot(dataset)
    job_file = kit.write_job(tmp_path / "jobs" / "learn.json", kit.learn_job(dataset, base_registry, tmp_path / "out", 2))
    env = kit.worker_env(HOME=str(home), TMPDIR=str(temp), MPLCONFIGDIR=str(home / "mpl"))
    code, events, stderr = kit.run_worker(job_file, env=env, cwd=cwd)
    assert code == 0, stderr[-3000:]
    assert kit.tree_snapshot(dataset) == before
    assert not any(home.iterdir()) and not any(temp.iterdir()) and not any(cwd.iterdir())
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["learn.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["job-state.json", "result.json"]
    # Resuming a finished job repeats its result and changes nothing.
    snapshot = kit.tree_snapshot(base_registry)
    code, events, _ = kit.run_worker(job_file, "--resume", env=env, cwd=cwd)
    assert code == 0 and events[-1]["version"] == "v0002"
    assert kit.tree_snapshot(base_registry) == snapshot


# ------------------------------------------------------------------------------------------ cancel
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "cancel file"])
def test_cancel_stops_within_five_seconds_and_leaves_the_registry_as_it_was(kit, dataset, base_registry, tmp_path, how):
    job = kit.learn_job(dataset, base_registry, tmp_path / "out", iterations=5000)
    job["budget"]["val_every"] = 5000
    job_file = kit.write_job(tmp_path / "learn.json", job)
    before = kit.tree_snapshot(base_registry)
    worker = kit.Worker(job_file)
    worker.wait_for(lambda e: e["event"] == "progress" and e["iteration"] >= 3)
    started = time.monotonic()
    if how == "cancel file":
        (tmp_path / "out" / "cancel").write_text("")
    else:
        worker.proc.send_signal(getattr(signal, how))
    code, events, stderr = worker.finish(timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert code == (130 if how == "SIGINT" else 143), stderr[-2000:]
    assert_protocol(events, "add-kidney")
    cancelled = events[-1]
    assert cancelled["event"] == "cancelled" and cancelled["reason"] == how and cancelled["forced"] is False
    assert cancelled["exit_code"] == code and "unchanged" in cancelled["message"]
    assert kit.tree_snapshot(base_registry) == before
    assert not (tmp_path / "out" / "cancel").exists()  # the worker removes the cancel file it obeyed


def test_cancel_reaches_a_main_thread_that_swallows_it(tmp_path):
    """A main thread that never returns to our code (stuck in native code, or a library catching everything)
    is ended by the watcher thread within the grace period, with a cancelled event."""
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import sys, time\n"
        "from cimis.worker import Cancellation, EventStream\n"
        "events = EventStream(sys.stdout)\n"
        "Cancellation(events, grace_s=1.0).install()\n"
        "try:\n"
        "    events.emit('started')\n"
        "except BaseException:\n"
        "    pass\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(0.05)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["event"] == "started"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=10)
    elapsed = time.monotonic() - started
    event = json.loads(proc.stdout.readline())
    assert code == 143 and elapsed < 5
    assert event["event"] == "cancelled" and event["forced"] is True and event["reason"] == "SIGTERM"


def test_outside_the_main_thread_only_the_cancel_file_cancels(tmp_path):
    """A job run from a thread of another program (no signal handlers there) still obeys the cancel file,
    at its next check, and never interrupts or ends the host program."""
    import io
    import threading

    from cimis.worker import Cancellation, EventStream, JobCancelled

    handler_before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def job():
        cancellation = Cancellation(EventStream(io.StringIO()), grace_s=0.2, poll_s=0.05)
        cancellation.install()
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        cancellation.watch_file(tmp_path / "cancel")
        (tmp_path / "cancel").write_text("")
        deadline = time.monotonic() + 5
        while cancellation.reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # past the grace period: a process-owning watcher would have ended the process
        try:
            cancellation.check()
        except JobCancelled as exc:
            seen["reason"] = exc.reason
        finally:
            cancellation.uninstall()

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(timeout=10)
    assert seen == {"handler": handler_before, "reason": "cancel file"}


def test_the_worker_deletes_only_a_cancel_file_that_appeared_while_it_ran(tmp_path):
    """The cancel file it obeyed is the client's request and goes; a file with content that was there
    before the job started is someone's file and stays, even when it cancels the job."""
    import io

    from cimis.worker import Cancellation, EventStream

    for before, after, kept in (("a user's file", "a user's file", True), (None, "", False), ("", "", False)):
        cancel = tmp_path / f"cancel-{before}-{after}"
        if before is not None:
            cancel.write_text(before)
        cancellation = Cancellation(EventStream(io.StringIO()))
        cancellation.watch_file(cancel)
        cancel.write_text(after)
        cancellation.request("cancel file")
        cancellation.remove_cancel_file()
        assert cancel.exists() == kept


# ------------------------------------------------------------------------------- kill -9 and resume
def test_too_many_threads_are_capped_and_a_cancel_before_any_checkpoint_is_resumable(kit, dataset, base_registry, tmp_path):
    """Issue 14: ``threads: 1000000`` was accepted and the job failed after half a minute; a job cancelled
    before its first checkpoint was reported ``resumable: false`` although ``--resume`` then runs it."""
    job = kit.learn_job(dataset, base_registry, tmp_path / "out", iterations=5000, threads=1000000)
    job["budget"].update(checkpoint_every=5000, val_every=5000)
    job_file = kit.write_job(tmp_path / "learn.json", job)
    worker = kit.Worker(job_file)
    worker.wait_for(lambda e: e["event"] == "progress" and e["iteration"] >= 1)
    worker.proc.send_signal(signal.SIGTERM)
    code, events, stderr = worker.finish(timeout=30)
    assert code == 143, stderr[-2000:]
    capped = [e for e in events if e["event"] == "warning" and e["code"] == "threads_capped"]
    assert len(capped) == 1 and "1000000" in capped[0]["message"]
    device = next(e for e in events if e["event"] == "device")
    assert 1 <= device["threads"] <= (os.cpu_count() or 1)
    assert events[-1]["event"] == "cancelled" and events[-1]["resumable"] is True
    assert "--resume" in events[-1]["message"]
    job["budget"].update(iterations=2)
    kit.write_job(job_file, job)
    code, events, stderr = kit.run_worker(job_file, "--resume")
    assert code == 0 and events[-1]["event"] == "done", stderr[-3000:]


def test_kill_9_at_several_points_then_resume(kit, dataset, base_registry, tmp_path):
    """Kill the worker during data loading, after a checkpoint, at the start of the final save, while the
    new version is being staged in the registry and after it was published but before it was activated.
    After every kill each registry version loads and v0001 stays active; --resume finishes the job once."""
    out = tmp_path / "out"
    job_file = kit.write_job(tmp_path / "learn.json", kit.learn_job(dataset, base_registry, out, iterations=6))
    registry = Registry.open(base_registry)
    before = kit.tree_snapshot(base_registry / "versions")

    def killed_at(predicate, *args, pause: str | None = None) -> list[dict]:
        env = kit.worker_env(**({"CIMIS_WORKER_PAUSE_AT": pause} if pause else {}))
        worker = kit.Worker(job_file, *args, env=env)
        worker.wait_for(predicate)
        worker.kill9()
        assert load_every_version(base_registry)[0] == "v0001"
        return worker.events

    # 1. during data loading: the training stage has begun, no iteration yet.
    events = killed_at(lambda e: e["event"] == "stage" and e["stage"] == "training")
    assert not [e for e in events if e["event"] == "progress"]
    assert registry.active_version() == "v0001" and kit.tree_snapshot(base_registry / "versions") == before

    # 2. mid-training, after a checkpoint (the first run had none, so this one starts afresh).
    events = killed_at(lambda e: e["event"] == "checkpoint", "--resume")
    assert [e["iteration"] for e in events if e["event"] == "progress"][0] == 1
    assert registry.active_version() == "v0001" and kit.tree_snapshot(base_registry / "versions") == before
    checkpoint = json.loads((out / "run" / "checkpoint" / "state.json").read_text())["iteration"]
    assert checkpoint in (2, 4)

    # 3. at the start of the final save: resumed from the checkpoint, not from the beginning.
    events = killed_at(lambda e: e["event"] == "paused", "--resume", pause="stage:saving")
    progress = [e["iteration"] for e in events if e["event"] == "progress"]
    assert progress == list(range(checkpoint + 1, 7))
    assert registry.active_version() == "v0001" and kit.tree_snapshot(base_registry / "versions") == before

    # 4. while the new version is half copied into the registry's staging folder.
    killed_at(lambda e: e["event"] == "paused", "--resume", pause="publish:partial")
    assert any((base_registry / "staging").iterdir())  # the leftover, never read as a version
    assert registry.active_version() == "v0001" and kit.tree_snapshot(base_registry / "versions") == before

    # 5. after the version appeared, before it became active.
    killed_at(lambda e: e["event"] == "paused", "--resume", pause="publish:published")
    assert registry.version_names() == ["v0001", "v0002"] and registry.active_version() == "v0001"
    assert not any((base_registry / "staging").iterdir())  # the stale staging of the killed run was swept

    # Resume finishes: the version published by the killed run is activated, not published twice.
    code, events, stderr = kit.run_worker(job_file, "--resume")
    assert code == 0, stderr[-3000:]
    assert events[-1]["event"] == "done" and events[-1]["version"] == "v0002"
    assert registry.version_names() == ["v0001", "v0002"] and registry.active_version() == "v0002"
    assert load_every_version(base_registry) == ["v0001", "v0002"]
    assert sorted(p.name for p in out.iterdir()) == ["job-state.json", "result.json"]


def test_a_new_job_in_a_used_output_folder_is_refused(kit, dataset, base_registry, tmp_path):
    out = tmp_path / "out"
    (out / "run" / "checkpoint").mkdir(parents=True)
    job_file = kit.write_job(tmp_path / "learn.json", kit.learn_job(dataset, base_registry, out))
    code, events, _ = kit.run_worker(job_file)
    assert code == 2 and "holds an earlier job" in events[-1]["message"] and "--resume" in events[-1]["hint"]


# ------------------------------------------------------------------------------------- bad inputs
def _corrupt(registry: Path, name: str, how: str) -> None:
    path = registry / "versions" / "v0001" / name
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 3]))


BAD_INPUTS = {
    "malformed job file": ("not valid JSON", None),
    "unknown key": ("unknown key 'iteratons'", "did you mean 'iterations'"),
    "missing file": ("does not exist", None),
    "class name already in the model": ("already has a class named 'liver'", "another name"),
    "label on another grid": ("grid", None),
    "no voxel of a new class": ("no voxel of any class to learn", "paint"),
    "corrupted model": ("does not match the checksum", "activate another version"),
    "truncated model": ("truncated", "activate another version"),
    "truncated model card": ("unreadable or truncated", "activate another version"),
    # Data-loss cases (issue 14): the worker deleted a cancel_file naming a user's file, and a user's tmp/.
    "cancel file names an existing file": ("not inside the output folder", "new file"),
    "output folder holds a user's tmp": ("tmp folder that is not the job's", "move it away"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_an_error_event_and_writes_nothing(kit, dataset, base_registry, tmp_path, case):
    job = kit.learn_job(dataset, base_registry, tmp_path / "out")
    text = None
    if case == "malformed job file":
        text = json.dumps(job)[:-1] + ",}"
    elif case == "unknown key":
        job["budget"]["iteratons"] = 5
    elif case == "missing file":
        job["data"]["cases"][0]["image"] = str(tmp_path / "nowhere.nii.gz")
    elif case == "class name already in the model":
        job["data"]["classes"][0]["name"] = "Liver"
    elif case == "label on another grid":
        label = sitk.ReadImage(str(dataset / "new_0.nii.gz"))
        label.SetSpacing([s * 1.5 for s in label.GetSpacing()])
        sitk.WriteImage(label, str(tmp_path / "moved.nii.gz"))
        job["data"]["cases"][0]["label"] = str(tmp_path / "moved.nii.gz")
    elif case == "no voxel of a new class":
        label = sitk.ReadImage(str(dataset / "new_0.nii.gz"))
        empty = sitk.Image(label.GetSize(), label.GetPixelID())
        empty.CopyInformation(label)
        sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
        job["data"]["cases"][0]["label"] = str(tmp_path / "empty.nii.gz")
    elif case == "corrupted model":
        _corrupt(base_registry, "weights.safetensors", "flip")
    elif case == "truncated model":
        _corrupt(base_registry, "weights.safetensors", "truncate")
    elif case == "truncated model card":
        _corrupt(base_registry, "card.json", "truncate")
    elif case == "cancel file names an existing file":
        mine = tmp_path / "my_ct.nii.gz"
        mine.write_bytes(kit.image_of(dataset, 0).read_bytes())
        job["cancel_file"] = str(mine)
    elif case == "output folder holds a user's tmp":
        (tmp_path / "out" / "tmp").mkdir(parents=True)
        (tmp_path / "out" / "tmp" / "notes.txt").write_text("the user's")
    job_file = kit.write_job(tmp_path / "job.json", text or job)
    before = kit.tree_snapshot(tmp_path)
    started = time.monotonic()
    code, events, stderr = kit.run_worker(job_file)
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == "user" and error["exit_code"] == 2
    words, hint = BAD_INPUTS[case]
    assert words.lower() in error["message"].lower(), error
    if hint:
        assert hint.lower() in (error["hint"] or "").lower(), error
    assert [e["event"] for e in events if e["event"] not in ("stage",)] == ["started", "error"]
    assert kit.tree_snapshot(tmp_path) == before  # nothing written: no output folder, registry untouched
    assert time.monotonic() - started < 30  # refused before any model is loaded or trained


# ---------------------------------------------------------------------------------------- pickles
class _WritesAFile:
    """Unpickling this runs code that writes ``path``: what a malicious "model" would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('unpickled')",))


def _crafted_pickle(tmp_path: Path, marker: Path) -> bytes:
    data = pickle.dumps(_WritesAFile(str(marker)), protocol=4)
    # The payload is live: unpickling it in a throwaway process does write the marker.
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(data)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(probe)!r}, 'rb'))"], check=True)
    assert marker.exists()
    marker.unlink()
    probe.unlink()
    return data


def test_a_pickle_model_is_refused_and_never_unpickled(kit, dataset, base_registry, tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = _crafted_pickle(tmp_path, marker)

    # 1. A pickle offered to `cimis models import`.
    evil = tmp_path / "model.pt"
    evil.write_bytes(payload)
    before = kit.tree_snapshot(base_registry)
    result = subprocess.run([sys.executable, "-m", "cimis.cli", "models", "import", str(evil), "--registry",
                             str(base_registry)], capture_output=True, text=True, env=kit.worker_env())
    assert result.returncode == 2 and "pickle" in result.stderr and "Traceback" not in result.stderr
    assert kit.tree_snapshot(base_registry) == before and not marker.exists()

    # 2. The active version's weights replaced by the pickle, its card's checksum forged to match, so that
    #    only the file format stands between the pickle and the loader.
    version = base_registry / "versions" / "v0001"
    for name in ("weights.safetensors", "card.json"):
        (version / name).chmod(0o644)
    (version / "weights.safetensors").write_bytes(payload)
    card = json.loads((version / "card.json").read_text())
    card["checksums"]["weights.safetensors"] = hashlib.sha256(payload).hexdigest()
    (version / "card.json").write_text(json.dumps(card))
    job_file = kit.write_job(tmp_path / "seg.json", kit.segment_job(dataset, base_registry, tmp_path / "out"))
    before = kit.tree_snapshot(tmp_path)
    code, events, stderr = kit.run_worker(job_file)
    assert code == 2, stderr[-2000:]
    assert events[-1]["event"] == "error" and "pickle" in events[-1]["message"]
    assert "unpickling can run arbitrary code" in events[-1]["message"]
    assert not marker.exists()
    assert kit.tree_snapshot(tmp_path) == before  # nothing written: no output folder, no marker


@pytest.mark.parametrize("user_folder", ["run", "labels"])
def test_resume_in_a_folder_that_never_held_a_job_leaves_the_users_files_alone(kit, dataset, base_registry, tmp_path,
                                                                               user_folder):
    """With --resume and no job state, run/ or labels/ are a user's: finishing would delete run/ and a
    segment job would take labels/phantom_002.nii.gz as its output for the image of that name."""
    out = tmp_path / "out"
    (out / user_folder).mkdir(parents=True)
    (out / user_folder / "phantom_002.nii.gz").write_bytes(b"a user's label map")
    before = kit.tree_snapshot(out)
    job_file = kit.write_job(tmp_path / "segment.json", kit.segment_job(dataset, base_registry, out))
    code, events, stderr = kit.run_worker(job_file, "--resume")
    assert code == 2, stderr[-3000:]
    assert events[-1]["event"] == "error" and "holds files of no job to resume" in events[-1]["message"]
    assert kit.tree_snapshot(out) == before
