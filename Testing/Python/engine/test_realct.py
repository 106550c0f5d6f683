"""The real-CT story: its survival table (each old organ's base Dice and the share each strategy keeps) and
the `cimis story` command on a TotalSegmentator-style folder."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.cli import main
from cimis.data.adapters import TOTALSEG_CT, TOTALSEG_TO_BTCV
from cimis.data.classes import ClassInfo, ClassSet
from cimis.evaluate import compare_label_maps
from cimis.metrics import EvaluationReport
from cimis.data.phantom import generate_phantom
from cimis.errors import CimisError
from cimis.realct import REAL_CT_OLD, survival_table
from cimis.story import StoryResult

CLASSES = ClassSet([ClassInfo("liver", 1, None), ClassInfo("spleen", 2, None)])


def _report(prediction: np.ndarray, reference: np.ndarray) -> EvaluationReport:
    images = [sitk.GetImageFromArray(a.astype(np.uint8)) for a in (prediction, reference)]
    return EvaluationReport(CLASSES, [compare_label_maps(images[0], images[1], CLASSES, "case", hd95=False)])


def test_survival_is_each_strategys_dice_over_the_base_models():
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[:, :4, :4] = 1  # liver: 64 voxels
    reference[:, 4:, 4:] = 2  # spleen: 64 voxels
    half_liver = reference.copy()
    half_liver[:, :2, :4] = 0  # 32 of the 64 liver voxels lost: Dice 2*32/(32+64) = 2/3
    no_spleen = np.where(reference == 2, 0, reference)
    result = StoryResult(["liver", "spleen"], [], reports={
        "base": _report(reference, reference), "ft": _report(no_spleen, reference),
        "pgcd-dapd": _report(half_liver, reference)})

    table = survival_table(result)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[3:]}
    assert rows["liver"] == ["1.000", "1.000", "0.667"]
    assert rows["spleen"] == ["1.000", "0.000", "1.000"]


# ------------------------------------------------------------------------------------- the `cimis story` command


@pytest.fixture(scope="module")
def totalseg_folder(tmp_path_factory):
    """A TotalSegmentator-style folder (v2 label values) holding a BTCV phantom instead of the real CT."""
    folder = tmp_path_factory.mktemp("totalseg")
    phantom = generate_phantom(2, "btcv", (6.0, 6.0, 6.0))
    btcv = sitk.GetArrayFromImage(phantom.label)
    totalseg = np.zeros_like(btcv)
    for totalseg_value, btcv_value in TOTALSEG_TO_BTCV["v2"].items():
        totalseg[btcv == btcv_value] = totalseg_value
    label = sitk.GetImageFromArray(totalseg)
    label.CopyInformation(phantom.label)
    sitk.WriteImage(phantom.image, str(folder / TOTALSEG_CT))
    sitk.WriteImage(label, str(folder / "example_seg_total_v2.nii.gz"))
    return folder


def test_story_command_writes_the_story_and_the_survival_table(capsys, totalseg_folder, tmp_path):
    out = tmp_path / "story"
    code = main(["story", "--totalseg", str(totalseg_folder), "--out", str(out), "--device", "cpu",
                 "--base-iterations", "2", "--step-iterations", "2"])
    assert code == 0, capsys.readouterr().err
    assert "the 'train' split" in (out / "story.md").read_text()  # one case: trained and evaluated on it
    survival = (out / "survival.md").read_text()
    rows = [line.split("|")[1].strip() for line in survival.splitlines()[4:]]
    assert rows == REAL_CT_OLD
    assert (out / "overlay.png").stat().st_size > 10_000


def test_story_command_never_replaces_a_folder_it_did_not_write(capsys, totalseg_folder, tmp_path):
    (tmp_path / "notes.txt").write_text("a user's file")
    code = main(["story", "--totalseg", str(totalseg_folder), "--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "choose another --out" in err
    assert (tmp_path / "notes.txt").read_text() == "a user's file"


def test_story_command_on_a_folder_without_the_example_is_one_line(capsys, tmp_path):
    code = main(["story", "--totalseg", str(tmp_path), "--out", str(tmp_path / "story")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        line for line in err.splitlines() if line.strip()]
    assert "example_ct.nii.gz" in err
    assert not (tmp_path / "story").exists()  # the input is checked before anything is written


def test_story_and_demo_replace_only_their_own_earlier_output(capsys, totalseg_folder, tmp_path):
    """--overwrite clears a folder only when it carries the command's marker and nothing a user added;
    without --overwrite nothing is deleted (issue 14, item 4)."""
    from cimis.demo import prepare_output

    earlier = tmp_path / "earlier"
    prepare_output(earlier, overwrite=False)  # what an earlier demo run leaves: the marker, then its outputs
    (earlier / "phantoms").mkdir()
    (earlier / "phantoms" / "case.nii.gz").write_text("demo output")
    (earlier / "notes.txt").write_text("a user's file")
    for overwrite in (False, True):
        with pytest.raises(CimisError, match="notes.txt"):
            prepare_output(earlier, overwrite)
        assert (earlier / "notes.txt").read_text() == "a user's file"
        assert (earlier / "phantoms" / "case.nii.gz").exists()
    (earlier / "notes.txt").unlink()
    with pytest.raises(CimisError, match="earlier demo") as info:
        prepare_output(earlier, overwrite=False)
    assert "--overwrite" in info.value.hint
    assert (earlier / "phantoms" / "case.nii.gz").exists()
    prepare_output(earlier, overwrite=True)  # only the demo's own output: replaced
    assert sorted(p.name for p in earlier.iterdir()) == [".cimis-demo"]

    user = tmp_path / "user"  # no marker: never cleared, even with --overwrite
    user.mkdir()
    (user / "scan.nii.gz").write_text("a user's file")
    code = main(["story", "--totalseg", str(totalseg_folder), "--out", str(user), "--overwrite", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "does not hold an earlier story" in err
    assert (user / "scan.nii.gz").read_text() == "a user's file"
    # A demo folder is not a story folder: story --overwrite refuses it.
    with pytest.raises(CimisError, match="earlier story"):
        prepare_output(earlier, True, "story", ".cimis-story", ("x",))


# ------------------------------------------------------------------- the story across patients (--manifest)


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory):
    """Four BTCV phantoms standing in for a published dataset: 2 train, 1 val, 1 test."""
    folder = tmp_path_factory.mktemp("dataset")
    assert main(["phantom", "--out", str(folder), "--cases", "4", "--spacing", "6", "--val-cases", "1",
                 "--test-cases", "1"]) == 0
    return folder / "manifest.json"


def test_story_on_a_manifest_trains_on_train_and_scores_on_other_patients(capsys, phantom_dataset, tmp_path):
    from cimis.data.manifest import Manifest

    out = tmp_path / "story"
    code = main(["story", "--manifest", str(phantom_dataset), "--out", str(out), "--device", "cpu",
                 "--old", "liver,spleen", "--new", "stomach", "--spacing", "6",
                 "--base-iterations", "1", "--step-iterations", "1"])
    assert code == 0, capsys.readouterr().err
    assert "held-out data" in (out / "story.md").read_text()
    survival = (out / "survival.md").read_text()
    assert [line.split("|")[1].strip() for line in survival.splitlines()[4:]] == ["spleen", "liver"]  # the dataset's class order
    dataset = Manifest.load(phantom_dataset)
    scored = sorted(p.name for p in (out / "ft" / "predictions").iterdir())
    assert scored == [f"{case_id}.nii.gz" for case_id in dataset.splits["test"]]  # only the held-out patient
    assert not set(dataset.splits["test"]) & set(dataset.splits["train"])


@pytest.mark.parametrize("arguments, message", [
    (["--old", "liver", "--new", "brain"], "has no class 'brain'"),
    (["--old", "liver", "--new", "liver"], "both old and new"),
    (["--spacing", "0"], "expected 3 positive numbers"),
])
def test_story_on_a_manifest_refuses_bad_choices_before_writing(capsys, phantom_dataset, tmp_path, arguments, message):
    out = tmp_path / "story"
    with pytest.raises(SystemExit) if "--spacing" in arguments else _no_exit():
        code = main(["story", "--manifest", str(phantom_dataset), "--out", str(out), *arguments])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_story_without_test_cases_or_with_both_sources_is_refused(capsys, phantom_dataset, totalseg_folder, tmp_path):
    from cimis.data.manifest import Manifest

    dataset = Manifest.load(phantom_dataset)
    no_test = Manifest(dataset.name, dataset.classes, dataset.cases, {"train": dataset.splits["train"]}, dataset.root)
    path = no_test.save(tmp_path / "no_test.json")
    assert main(["story", "--manifest", str(path), "--out", str(tmp_path / "a")]) == 2
    assert "no 'test' cases" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["story", "--manifest", str(phantom_dataset), "--totalseg", str(totalseg_folder)])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["story", "--totalseg", str(totalseg_folder), "--old", "liver", "--out", str(tmp_path / "b")]) == 2
    assert "apply to --manifest" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
