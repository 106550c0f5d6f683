"""The model registry: immutable versions, atomic active pointer, rollback, delete, export and import with
every archive check (escaping paths, links, unexpected and pickle files, damaged weights), and `cimis models`."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from cimis.cli import main
from cimis.data.classes import ClassSet
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.model.modelfile import ModelCard, save_model
from cimis.model.network import NetworkConfig, SegmentationNet
from cimis.registry import Registry, staging_name, verify_model_folder

TINY = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])
CLASSES = ClassSet.from_names(["liver", "spleen"])


def make_model(folder: Path, seed: int = 0, classes: ClassSet = CLASSES) -> Path:
    torch.manual_seed(seed)
    net = SegmentationNet(TINY, classes.num_channels)
    card = ModelCard(classes, TINY, PreprocessConfig(spacing=[8.0] * 3, patch_size=[32, 32, 16]),
                     history=[{"step": 0, "kind": "train"}])
    prototypes = (torch.randn(classes.num_channels, TINY.feature_dim), torch.ones(classes.num_channels, dtype=torch.bool))
    return save_model(folder, net, card, prototypes=prototypes)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [make_model(root / f"m{i}", seed=i) for i in range(2)]


@pytest.fixture
def registry(tmp_path, models) -> Registry:
    reg = Registry.open(tmp_path / "registry", create=True)
    reg.publish(models[0], {"kind": "train", "note": "first"})
    return reg


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ------------------------------------------------------------------------------------------ versions
def test_publish_activate_rollback_and_delete(registry, models):
    assert registry.version_names() == ["v0001"] and registry.active_version() == "v0001"
    steps = []
    assert registry.publish(models[1], {"kind": "learn"}, activate=False, on_step=steps.append) == "v0002"
    assert steps == ["partial", "staged", "published", "activated"]
    assert registry.active_version() == "v0001"
    registry.activate("2")
    active = json.loads((registry.root / "active.json").read_text())
    assert active["version"] == "v0002" and active["previous"] == "v0001"
    assert registry.activate("v0001") == "v0001"  # rollback
    with pytest.raises(CimisError, match="active version and cannot be deleted"):
        registry.delete("v0001")
    registry.delete("v0002")
    assert registry.version_names() == ["v0001"]
    # A deleted version's name is never given again.
    assert registry.publish(models[1], {"kind": "learn"}) == "v0003"
    assert not any(registry.staging_dir.iterdir()) and not any(registry.trash_dir.iterdir())


def test_versions_are_complete_read_only_and_load(registry, models):
    folder = registry.path("v0001")
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "prototypes.safetensors", "summary.json",
                                                          "weights.safetensors"]
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in folder.iterdir())
    assert all(p.stat().st_mode & 0o222 == 0 for p in folder.iterdir())
    summary = registry.summary("v0001")
    assert summary["format"] == "cimis-version/1" and summary["note"] == "first" and summary["classes"] == ["liver", "spleen"]
    net, card, prototypes = registry.load()
    assert card.classes == CLASSES and prototypes[0].shape == (3, TINY.feature_dim)
    info = registry.list()[0]
    assert info.active and info.kind == "train" and info.classes == ["liver", "spleen"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "card"])
def test_damaged_versions_are_refused_on_load_and_activate(registry, models, damage):
    registry.publish(models[1], {}, activate=False)
    target = registry.path("v0002") / ("card.json" if damage == "card" else "weights.safetensors")
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    target.write_bytes(bytes(data if damage == "flip" else data[: len(data) // 2]))
    with pytest.raises(CimisError, match="v0002") as info:
        registry.load("v0002")
    assert "activate another version" in info.value.hint
    with pytest.raises(CimisError):
        registry.activate("v0002")
    assert registry.active_version() == "v0001"
    registry.load("v0001")  # the other versions are unaffected


def test_version_names_cannot_be_paths(registry):
    for bad in ("../v0001", "/etc", "v1/..", "latest"):
        with pytest.raises(CimisError, match="not a version name"):
            registry.resolve(bad)
    with pytest.raises(CimisError, match="no version v0007"):
        registry.resolve("7")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # just ended; not reused within the test


def test_stale_staging_of_dead_processes_is_swept(registry, models):
    stale = registry.staging_dir / staging_name(_dead_pid())
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"half")
    registry.publish(models[1], {})
    assert not stale.exists()


def test_the_sweep_leaves_other_machines_staging_alone_until_it_is_a_day_old(registry, models):
    """Issue 14, item 12: on a registry shared by several machines, a dead-looking PID of another host is
    a live process there; only this machine's dead writers (or this machine's earlier boots) are swept."""
    dead = _dead_pid()
    other_host = registry.staging_dir / staging_name(dead, host="0123456789ab")
    earlier_boot = registry.staging_dir / staging_name(dead, boot="0123456789ab")
    legacy = registry.staging_dir / f"{dead}-deadbeef"  # an older writer's name: no host recorded
    old_other_host = registry.staging_dir / staging_name(dead, host="ba9876543210")
    for item in (other_host, earlier_boot, legacy, old_other_host):
        item.mkdir()
        (item / "card.json").write_text("{}")
    two_days_ago = time.time() - 2 * 86400
    for path in (old_other_host / "card.json", old_other_host):
        os.utime(path, (two_days_ago, two_days_ago))
    registry.publish(models[1], {})
    assert other_host.exists() and legacy.exists()
    assert not earlier_boot.exists() and not old_other_host.exists()


def test_the_sweep_runs_under_the_registry_lock(registry):
    stale = registry.staging_dir / staging_name(_dead_pid())
    stale.mkdir()
    swept = threading.Event()
    with open(registry.root / ".lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # another writer holds the lock
        sweeper = threading.Thread(target=lambda: (registry.sweep(), swept.set()))
        sweeper.start()
        assert not swept.wait(1.0) and stale.exists()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    assert swept.wait(10) and not stale.exists()
    sweeper.join()


def test_a_killed_job_is_found_by_its_token(registry, models):
    name = registry.publish(models[1], {"job": {"id": "j", "token": "abc"}}, activate=False)
    assert registry.find_by_job_token("abc") == name and registry.find_by_job_token("other") is None


def test_opening_a_folder_that_is_not_a_registry(tmp_path):
    with pytest.raises(CimisError, match="no model registry"):
        Registry.open(tmp_path / "none")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(CimisError, match="not a model registry"):
        Registry.open(tmp_path / "busy", create=True)


# ------------------------------------------------------------------------------------ export/import
def test_export_and_import_round_trip(registry, tmp_path):
    archive = registry.export("v0001", tmp_path / "liver.tar.gz")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["card.json", "prototypes.safetensors", "summary.json", "weights.safetensors"]
    other = Registry.open(tmp_path / "other", create=True)
    assert other.import_model(archive, activate=True) == "v0001"
    net, card, _ = other.load()
    assert card.classes == CLASSES
    assert (other.path("v0001") / "weights.safetensors").read_bytes() == (registry.path("v0001") / "weights.safetensors").read_bytes()
    summary = other.summary("v0001")
    assert summary["note"] == "first" and summary["imported"]["from"] == "liver.tar.gz"
    # A model folder written by `cimis train` imports too.
    assert other.import_model(registry.path("v0001")) == "v0002"


def _archive(path: Path, members: list[tuple[str, bytes | None, str]]) -> Path:
    """A tar.gz with members (name, data, type): type "file", "symlink", "hardlink" or "dir"."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[kind]
                info.linkname = "/etc/passwd" if kind != "dir" else ""
                tar.addfile(info)
    return path


def _version_members(folder: Path) -> list[tuple[str, bytes, str]]:
    return [(p.name, p.read_bytes(), "file") for p in sorted(folder.iterdir())]


@pytest.mark.parametrize("name, change, message", [
    ("absolute", lambda m: m + [("/tmp/evil.txt", b"x", "file")], "absolute path"),
    ("dotdot", lambda m: m + [("../evil.txt", b"x", "file")], "escape the target folder"),
    ("nested dotdot", lambda m: [("model/../../evil.txt", b"x", "file")] + m, "escape the target folder"),
    ("symlink", lambda m: m + [("summary.json", None, "symlink")], "link"),
    ("hardlink", lambda m: [x for x in m if x[0] != "card.json"] + [("card.json", None, "hardlink")], "link"),
    ("unexpected file", lambda m: m + [("run.sh", b"rm -rf /", "file")], "unexpected file"),
    ("pickle file", lambda m: m + [("model.pt", b"\x80\x04.", "file")], "pickle"),
    ("missing weights", lambda m: [x for x in m if x[0] != "weights.safetensors"], "no weights.safetensors"),
    ("two folders", lambda m: [("a/" + n, d, k) for n, d, k in m[:2]] + [("b/" + n, d, k) for n, d, k in m[2:]], "several folders"),
    ("tampered weights", lambda m: [(n, d[:-4] + b"\x00\x00\x00\x00" if n == "weights.safetensors" else d, k) for n, d, k in m], "checksum"),
    ("pickle weights", lambda m: [(n, b"\x80\x04\x95" + d if n == "weights.safetensors" else d, k) for n, d, k in m], "pickle"),
])
def test_import_refuses_bad_archives_and_writes_nothing(registry, tmp_path, name, change, message):
    archive = _archive(tmp_path / "bad.tar.gz", change(_version_members(registry.path("v0001"))))
    before = files_under(registry.root)
    with pytest.raises(CimisError, match=message):
        registry.import_model(archive)
    assert files_under(registry.root) - {".lock"} == before - {".lock"}
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_import_accepts_a_single_top_level_folder(registry, tmp_path):
    members = [("model/", None, "dir")] + [("model/" + n, d, k) for n, d, k in _version_members(registry.path("v0001"))]
    assert registry.import_model(_archive(tmp_path / "ok.tar.gz", members)) == "v0002"


def test_import_refuses_pickles_zips_and_truncated_archives(registry, tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")  # a zip holding data.pkl
    with pytest.raises(CimisError, match="pickle"):
        registry.import_model(tmp_path / "model.pt")
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(CimisError, match="pickle"):
        registry.import_model(tmp_path / "model.pkl")
    archive = registry.export("v0001", tmp_path / "whole.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CimisError, match="truncated|corrupted|not a model archive"):
        registry.import_model(truncated)
    assert registry.version_names() == ["v0001"] and not any(registry.staging_dir.iterdir())


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, streamed (a bomb's payload, never held in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_a_decompression_bomb_is_refused_as_it_is_read_without_filling_staging(registry, tmp_path):
    """Issue 14, item 11: 4 MB of gzip expanding to 4 GiB of "weights" was written and fsynced into staging
    before the import was refused. Now the expansion ratio is watched while the archive is read."""
    members = _version_members(registry.path("v0001"))
    bomb = tmp_path / "bomb.tar.gz"
    size = 160 * 2**20
    with tarfile.open(bomb, "w:gz", compresslevel=9) as tar:
        for name, data, _ in members:
            if name == "weights.safetensors":
                info = tarfile.TarInfo(name)
                info.size = size
                tar.addfile(info, io.BufferedReader(_Zeros(size)))
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert bomb.stat().st_size < size // 500
    before = files_under(registry.root)
    started = time.monotonic()
    with pytest.raises(CimisError, match="decompression bomb"):
        registry.import_model(bomb)
    assert time.monotonic() - started < 10
    assert files_under(registry.root) - {".lock"} == before - {".lock"}


def test_a_tensor_file_larger_than_its_card_declares_is_refused_before_it_is_written(registry, tmp_path, monkeypatch):
    """Incompressible bytes beyond what the card's network can need never reach the disk either."""
    members = _version_members(registry.path("v0001"))
    padded = [(n, d + os.urandom(2 * 2**20) if n == "weights.safetensors" else d, k) for n, d, k in members]
    archive = _archive(tmp_path / "padded.tar.gz", padded)
    written = []
    real_open = open

    def watching_open(file, mode="r", *args, **kwargs):
        if "x" in str(mode):
            written.append(Path(file).name)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    with pytest.raises(CimisError, match="more than the .* that the model its card describes can need"):
        registry.import_model(archive)
    assert "weights.safetensors" not in written and "card.json" in written


def test_verify_model_folder_names_pickle_files(tmp_path, models):
    folder = tmp_path / "m"
    folder.mkdir()
    for p in models[0].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "extra.pth").write_bytes(b"\x80\x04")
    with pytest.raises(CimisError, match="pickle"):
        verify_model_folder(folder)


# ------------------------------------------------------------------------------------- cimis models
def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_models_command(capsys, registry, models, tmp_path):
    reg = ["--registry", registry.root]
    registry.publish(models[1], {"kind": "learn", "note": "second"}, activate=False)
    code, out, _ = run_cli(capsys, "models", "list", *reg)
    assert code == 0 and "* v0001" in out and "  v0002" in out and "second" in out
    code, out, _ = run_cli(capsys, "models", "list", "--json", *reg)
    assert [v["version"] for v in json.loads(out)] == ["v0001", "v0002"]
    code, out, _ = run_cli(capsys, "models", "show", *reg)
    assert code == 0 and "v0001 (active)" in out and "checksums ok" in out and "liver (1)" in out
    code, out, _ = run_cli(capsys, "models", "activate", "v0002", *reg)
    assert code == 0 and registry.active_version() == "v0002"
    code, out, _ = run_cli(capsys, "models", "export", "v0002", "--out", tmp_path / "v2.tar.gz", *reg)
    assert code == 0 and (tmp_path / "v2.tar.gz").is_file()
    code, out, err = run_cli(capsys, "models", "delete", "v0002", *reg)
    assert code == 2 and err.startswith("error: v0002 is the active version")
    code, out, _ = run_cli(capsys, "models", "import", tmp_path / "v2.tar.gz", "--activate", *reg)
    assert code == 0 and "v0003 (active)" in out and registry.active_version() == "v0003"
    code, out, _ = run_cli(capsys, "models", "delete", "v0002", *reg)
    assert code == 0 and registry.version_names() == ["v0001", "v0003"]
    # Importing into a folder that is not a registry yet creates it; a refused import creates nothing.
    code, _, err = run_cli(capsys, "models", "import", tmp_path / "missing.tar.gz", "--registry", tmp_path / "new")
    assert code == 2 and not (tmp_path / "new").exists()
    code, out, _ = run_cli(capsys, "models", "import", tmp_path / "v2.tar.gz", "--registry", tmp_path / "new")
    assert code == 0 and Registry.open(tmp_path / "new").version_names() == ["v0001"]
