"""The worker's ``import`` job: a MONAI bundle becomes a registry version with the chosen classes; a bad
bundle is one user error and leaves the registry as it was."""

from __future__ import annotations

import json
import signal

import pytest

from cimis.errors import CimisError
from cimis.jobs import parse_job
from cimis.registry import Registry

from ..model.conftest import CLASS_NAMES, write_bundle


def import_job(source, registry, output, **section) -> dict:
    return {"format": "cimis-job/1", "kind": "import", "id": "import-bundle", "registry": str(registry),
            "output": str(output), "device": "cpu", "threads": 1, "import": {"source": str(source), **section}}


def test_an_import_job_publishes_the_chosen_classes_as_a_new_active_version(kit, tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    job_file = kit.write_job(tmp_path / "job.json", import_job(bundle, tmp_path / "reg", tmp_path / "out",
                                                               classes=["kidney", "liver"]))
    code, events, stderr = kit.run_worker(job_file)
    assert code == 0, stderr
    done = events[-1]
    assert done["event"] == "done" and done["version"] == "v0001" and done["active"], done
    assert done["classes"] == ["liver", "kidney"]  # source channel order, not the order asked in
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["checking", "reading", "converting", "saving", "publishing"]
    assert [e["iteration"] for e in events if e["event"] == "progress"] == [0, 1, 2, 1]
    registry = Registry.open(tmp_path / "reg")
    card = registry.card("v0001")
    assert [c["name"] for c in card["classes"]] == ["liver", "kidney"]
    assert registry.summary("v0001")["kind"] == "import"
    registry.load("v0001")  # the published version loads as any other
    assert not (tmp_path / "out" / "run").exists() and not (tmp_path / "out" / "tmp").exists()

    # A second import, cancelled just before it publishes: the registry is unchanged, and --resume publishes
    # the converted model without converting again; with an active version there, it stays inactive.
    job_file = kit.write_job(tmp_path / "job2.json", import_job(bundle, tmp_path / "reg", tmp_path / "out2"))
    before = kit.tree_snapshot(tmp_path / "reg")
    worker = kit.Worker(job_file, env=kit.worker_env(CIMIS_WORKER_PAUSE_AT="stage:publishing"))
    worker.wait_for(lambda e: e["event"] == "paused")
    worker.proc.send_signal(signal.SIGTERM)
    code, events, _ = worker.finish()
    assert code == 143 and events[-1]["event"] == "cancelled" and events[-1]["resumable"]
    assert kit.tree_snapshot(tmp_path / "reg") == before
    code, events, stderr = kit.run_worker(job_file, "--resume")
    assert code == 0, stderr
    assert "reading" not in [e.get("stage") for e in events]
    assert events[-1]["version"] == "v0002" and not events[-1]["active"]
    assert events[-1]["classes"] == CLASS_NAMES
    assert registry.active_version() == "v0001"


def test_a_bad_bundle_is_one_user_error_and_the_registry_is_unchanged(kit, tmp_path):
    from cimis.model.import_command import import_model

    bundle = write_bundle(tmp_path / "bundle")
    base_registry = tmp_path / "reg"
    import_model(bundle, tmp_path / "model")
    Registry.open(base_registry, create=True).import_model(tmp_path / "model", activate=True)
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    before = kit.tree_snapshot(base_registry)
    job_file = kit.write_job(tmp_path / "job.json", import_job(bundle, base_registry, tmp_path / "out"))
    code, events, stderr = kit.run_worker(job_file)
    assert code == 2, stderr
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "user" and "model.pt" in errors[0]["message"]
    assert kit.tree_snapshot(base_registry) == before
    assert not (tmp_path / "out").exists()  # a refused job leaves nothing behind


@pytest.mark.parametrize("section, message", [
    ({}, "import has no 'source'"),
    ({"source": "missing"}, "does not exist"),
    ({"source": ".", "classes": []}, "import.classes"),
    ({"source": ".", "fold": -1}, "import.fold"),
    ({"source": ".", "spacing": [1, 0, 1]}, "import.spacing"),
    ({"source": ".", "window": [300, -200]}, "low < high"),
    ({"source": ".", "patch_size": [32.5, 32, 32]}, "import.patch_size"),
    ({"source": ".", "activate": "yes"}, "import.activate"),
    ({"source": ".", "fodl": 0}, "unknown key 'fodl' in 'import'"),
])
def test_import_job_files_are_checked(tmp_path, section, message):
    data = {"format": "cimis-job/1", "kind": "import", "registry": "reg", "output": "out", "import": section}
    with pytest.raises(CimisError, match=message):
        parse_job(data, tmp_path, tmp_path / "job.json")


def test_an_import_job_file_parses(tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    data = {"format": "cimis-job/1", "kind": "import", "registry": "reg", "output": "out",
            "import": {"source": ".", "classes": ["liver"], "fold": 1, "spacing": [1.5, 1.5, 2],
                       "window": [-200, 300], "patch_size": [64, 64, 32], "activate": True},
            "data": {"volumes": ["ct.nii.gz"]}}
    job = parse_job(json.loads(json.dumps(data)), tmp_path, tmp_path / "job.json")
    assert job.kind == "import" and job.settings["source"] == tmp_path.absolute()
    assert job.settings["spacing"] == [1.5, 1.5, 2.0] and job.settings["patch_size"] == [64, 64, 32]
    assert job.settings["volumes"] == [tmp_path.absolute() / "ct.nii.gz"] and job.settings["activate"] is True
