"""The `cimis` command end to end, and every bad input of the foundation issue: one error line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.cli import main
from cimis.data.classes import btcv_classes
from cimis.data.manifest import Case, Manifest
from cimis.data.phantom import generate_phantom
from cimis.data.preprocess import PreprocessConfig
from cimis.model.modelfile import ModelCard, save_model
from cimis.model.network import NetworkConfig, SegmentationNet

TINY_NET = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    # Progress bars may precede it; the error itself is exactly one line.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    phantom = generate_phantom(5, "btcv", (8.0, 8.0, 8.0))
    sitk.WriteImage(phantom.image, str(folder / "ct.nii.gz"))
    sitk.WriteImage(phantom.label, str(folder / "label.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    net = SegmentationNet(TINY_NET, btcv_classes().num_channels)
    card = ModelCard(btcv_classes(), TINY_NET, PreprocessConfig(spacing=[8.0, 8.0, 8.0], patch_size=[32, 32, 16]))
    return save_model(tmp_path_factory.mktemp("model") / "model", net, card)


def write_manifest(folder, image, label) -> str:
    manifest = Manifest("bad", btcv_classes(), [Case("a", image, label), Case("b", image, label)],
                        {"train": ["a"], "val": [], "test": ["b"]}, folder)
    return str(manifest.save(folder / "manifest.json", overwrite=True))


def train_args(manifest, out):
    return ["train", "--manifest", manifest, "--out", out, "--network", "small", "--spacing", "8",
            "--patch", "32,32,16", "--iterations", "2", "--device", "cpu"]


# ------------------------------------------------------------------------------------------- happy path
def test_phantom_train_segment_evaluate_commands(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "phantom", "--out", tmp_path / "ds", "--cases", 3, "--spacing", 8, "--val-cases", 0)
    assert code == 0 and "manifest.json" in out
    manifest = tmp_path / "ds" / "manifest.json"
    code, out, err = run_cli(capsys, *train_args(manifest, tmp_path / "run"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "segment", "--model", tmp_path / "run" / "model", "--manifest", manifest,
                             "--split", "test", "--output", tmp_path / "pred", "--device", "cpu")
    assert code == 0, err
    assert "liver" in out and "volume (mL)" in out
    code, out, err = run_cli(capsys, "evaluate", "--manifest", manifest, "--split", "test",
                             "--predictions", tmp_path / "pred", "--out", tmp_path / "eval", "--hd95")
    assert code == 0, err
    assert "HD95" in out and (tmp_path / "eval" / "evaluation.csv").is_file()
    # Training into the same folder again must not silently replace the model.
    code, _, err = run_cli(capsys, *train_args(manifest, tmp_path / "run"))
    assert_one_line_error(code, err, "already exists")


# ------------------------------------------------------------------------------------------- bad inputs
def test_missing_input_file(capsys, tiny_model, tmp_path):
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", tmp_path / "nope.nii.gz",
                           "--output", tmp_path / "out.nii.gz")
    assert_one_line_error(code, err, "nope.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_unreadable_input_file(capsys, tiny_model, tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not an image")
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", tmp_path / "junk.nii.gz",
                           "--output", tmp_path / "out.nii.gz")
    assert_one_line_error(code, err, "junk.nii.gz")


def test_not_a_3d_image(capsys, tiny_model, tmp_path):
    sitk.WriteImage(sitk.Image(20, 20, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", tmp_path / "slice.nrrd",
                           "--output", tmp_path / "out.nii.gz")
    assert_one_line_error(code, err, "3D")


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])  # ITK's NIfTI reader alone would read NaN as 0
def test_nan_and_inf_voxels(capsys, tiny_model, tmp_path, suffix):
    array = np.zeros((16, 16, 16), dtype=np.float32)
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"nan{suffix}"))
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", tmp_path / f"nan{suffix}",
                           "--output", tmp_path / "out.nii.gz")
    assert_one_line_error(code, err, "1 NaN and 1 infinite")
    assert not (tmp_path / "out.nii.gz").exists()


def test_volume_too_large_for_memory(capsys, tiny_model, phantom_files, tmp_path, monkeypatch):
    monkeypatch.setenv("CIMIS_MEMORY_LIMIT_BYTES", str(10 * 2**20))
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", phantom_files / "ct.nii.gz",
                           "--output", tmp_path / "out.nii.gz")
    assert_one_line_error(code, err, "memory")
    assert "spacing" in err  # says what to change


def test_geometry_mismatch_between_image_and_label(capsys, phantom_files, tmp_path):
    label = sitk.ReadImage(str(phantom_files / "label.nii.gz"))
    label.SetOrigin([o + 5.0 for o in label.GetOrigin()])
    sitk.WriteImage(label, str(tmp_path / "shifted.nii.gz"))
    manifest = write_manifest(tmp_path, phantom_files / "ct.nii.gz", tmp_path / "shifted.nii.gz")
    code, _, err = run_cli(capsys, *train_args(manifest, tmp_path / "run"))
    assert_one_line_error(code, err, "shifted.nii.gz")
    assert not (tmp_path / "run" / "model").exists()


def test_label_values_outside_the_class_list(capsys, phantom_files, tmp_path):
    label = sitk.ReadImage(str(phantom_files / "label.nii.gz"))
    array = sitk.GetArrayFromImage(label)
    array[0, 0, :3] = 42
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    sitk.WriteImage(bad, str(tmp_path / "bad_values.nii.gz"))
    manifest = write_manifest(tmp_path, phantom_files / "ct.nii.gz", tmp_path / "bad_values.nii.gz")
    code, _, err = run_cli(capsys, *train_args(manifest, tmp_path / "run"))
    assert_one_line_error(code, err, "42")


def test_empty_label_map(capsys, phantom_files, tmp_path):
    label = sitk.ReadImage(str(phantom_files / "label.nii.gz")) * 0
    sitk.WriteImage(label, str(tmp_path / "empty.nii.gz"))
    manifest = write_manifest(tmp_path, phantom_files / "ct.nii.gz", tmp_path / "empty.nii.gz")
    code, _, err = run_cli(capsys, *train_args(manifest, tmp_path / "run"))
    assert_one_line_error(code, err, "empty.nii.gz")


def test_pickle_model_is_refused(capsys, phantom_files, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    code, _, err = run_cli(capsys, "segment", "--model", tmp_path / "model.pt", "--input",
                           phantom_files / "ct.nii.gz", "--output", tmp_path / "out.nii.gz")
    assert_one_line_error(code, err, "pickle")


def test_python_dash_m_cimis_runs_the_command(tmp_path):
    """Scripts and Slicer's Python call `python -m cimis`; a command-line mistake there is one line too."""
    proc = subprocess.run([sys.executable, "-m", "cimis", "train", "--manifest", str(tmp_path / "m.json"),
                           "--out", str(tmp_path / "run"), "--workers", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cimis train: argument --workers") and proc.stderr.count("\n") == 1


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "cimis.cli", "segment", "--model", str(tmp_path / "missing_model"),
         "--input", str(tmp_path / "ct.nii.gz"), "--output", str(tmp_path / "out.nii.gz")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- nothing lost (issue 14)
def run_cli_exiting(capsys, *args) -> tuple[int, str, str]:
    """Like run_cli, for mistakes argparse itself finds (it exits instead of returning)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("option, value", [("--workers", "-1"), ("--lr", "nan"), ("--lr", "-0.1"),
                                           ("--iterations", "0"), ("--spacing", "nan"), ("--patch", "0.5"),
                                           ("--window", "250,-175")])
def test_bad_numbers_on_the_command_line_are_one_line(capsys, tmp_path, option, value):
    code, _, err = run_cli_exiting(capsys, "train", "--manifest", tmp_path / "m.json", "--out", tmp_path / "run",
                                   f"{option}={value}")
    assert_one_line_error(code, err, option)
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_segment_manifest_never_writes_outside_output(capsys, tiny_model, phantom_files, tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({
        "format": "cimis-manifest/1", "name": "escape", "classes": btcv_classes().to_json(),
        "cases": [{"id": "../escaped", "image": str(phantom_files / "ct.nii.gz")}], "splits": {"test": ["../escaped"]}}))
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--manifest", manifest, "--split", "test",
                           "--output", tmp_path / "pred", "--device", "cpu")
    assert_one_line_error(code, err, "../escaped", "cannot name a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_segment_to_a_full_disk_keeps_the_existing_label_map(capsys, tiny_model, phantom_files, tmp_path):
    """On a real full file system (a small tmpfs; needs permission to mount one): exit 2 with one line, and
    the label map already there stays whole (issue 14, item 1)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)],
                             capture_output=True, timeout=30).returncode == 0 if sys.platform.startswith("linux") else False
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        target = disk / "seg.nii.gz"
        target.write_bytes((phantom_files / "label.nii.gz").read_bytes())
        good = target.read_bytes()
        with pytest.raises(OSError):  # fill the disk
            (disk / "filler").write_bytes(b"\0" * (1 << 20))
        code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", phantom_files / "ct.nii.gz",
                               "--output", target, "--overwrite", "--device", "cpu")
        assert_one_line_error(code, err, "cannot write", "seg.nii.gz")
        assert target.read_bytes() == good
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "seg.nii.gz"]
    finally:
        subprocess.run(["umount", str(disk)], timeout=30)


def test_evaluate_refuses_to_overwrite_a_report_and_a_file_as_out(capsys, phantom_files, tmp_path):
    args = ["evaluate", "--pred", phantom_files / "label.nii.gz", "--ref", phantom_files / "label.nii.gz",
            "--classes-from", write_manifest(tmp_path, phantom_files / "ct.nii.gz", phantom_files / "label.nii.gz")]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "eval")
    assert code == 0, err
    report = (tmp_path / "eval" / "evaluation.json").read_bytes()
    (tmp_path / "eval" / "evaluation.md").write_text("my notes on the evaluation")
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "eval")
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (tmp_path / "eval" / "evaluation.md").read_text() == "my notes on the evaluation"
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "eval", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "eval" / "evaluation.json").read_bytes() == report
    for out in (tmp_path / "eval" / "evaluation.md", tmp_path / "eval" / "evaluation.md" / "sub"):
        code, _, err = run_cli(capsys, *args, "--out", out)
        assert_one_line_error(code, err, "evaluation.md")


def test_control_characters_in_class_names_are_escaped_on_the_terminal(capsys, phantom_files, tmp_path):
    classes = [{"name": f"organ{v}\x1b[2J" if v == 1 else f"organ{v}", "value": v}
               for v in range(1, 14)]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"format": "cimis-manifest/1", "name": "m", "classes": classes, "cases": [],
                                    "splits": {}}))
    code, out, err = run_cli(capsys, "evaluate", "--pred", phantom_files / "label.nii.gz", "--ref",
                             phantom_files / "label.nii.gz", "--classes-from", manifest, "--out", tmp_path / "eval")
    assert code == 0, err
    assert "\x1b" not in out and "organ1\\x1b[2J" in out
