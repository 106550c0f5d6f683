"""Dataset adapters on fake trees in the real on-disk layouts, layout detection, and the real example CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.adapters import (
    TRANSUNET_TEST_IDS,
    build_manifest,
    detect_layout,
    from_btcv,
    from_decathlon,
    from_totalseg_example,
    from_word,
)
from cimis.data.classes import btcv_classes, word_classes
from cimis.data.io import read_image, same_geometry, write_image
from cimis.data.manifest import Manifest, load_case
from cimis.errors import CimisError

TOTALSEG_EXAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "totalseg_example"
# README of the example: BTCV value -> voxels in the v2 label map (esophagus, 5, is absent).
README_V2_VOXELS = {
    1: 9668, 2: 7134, 3: 5090, 4: 1319, 6: 41692, 7: 4836, 8: 1839, 9: 2266, 10: 1086, 11: 695, 12: 166, 13: 210,
}


def touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def assert_partition(m: Manifest, labelled: set[str]) -> None:
    """train, val and test are disjoint, cover every labelled case, and hold only labelled cases."""
    parts = [set(m.splits[s]) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(labelled) and set().union(*parts) == labelled
    assert all(m.case(i).label is not None for i in labelled)


def synapse_tree(root: Path, ids: list[str], testing: list[str] = ()) -> Path:
    training = root / "RawData" / "Training"
    for i in ids:
        touch(training / "img" / f"img{i}.nii.gz", training / "label" / f"label{i}.nii.gz")
    for i in testing:
        touch(root / "RawData" / "Testing" / "img" / f"img{i}.nii.gz")
    touch(training / "img" / ".DS_Store")
    return root


# --------------------------------------------------------------------------------------------- BTCV


def test_btcv_synapse_layout(tmp_path):
    ids = [f"{i:04d}" for i in range(1, 41)]
    root = synapse_tree(tmp_path / "btcv", ids, testing=["0061", "0062"])
    m = from_btcv(root)
    assert m.classes == btcv_classes() and m.root == root
    assert m.splits["test"] == list(TRANSUNET_TEST_IDS)
    assert len(m.splits["val"]) == round(0.2 * 28) and len(m.splits["train"]) == 28 - len(m.splits["val"])
    assert_partition(m, set(ids))
    assert m.case("0007").image == root / "RawData/Training/img/img0007.nii.gz"
    assert m.case("0007").label == root / "RawData/Training/label/label0007.nii.gz"
    assert m.splits["unlabelled"] == ["0061", "0062"] and m.case("0061").label is None
    assert from_btcv(root).splits == m.splits  # seeded
    assert from_btcv(root, seed=1).splits["val"] != m.splits["val"]
    # root may also be RawData or Training
    assert from_btcv(root / "RawData").cases == m.cases
    assert from_btcv(root / "RawData" / "Training").cases == m.cases
    assert detect_layout(root) == detect_layout(root / "RawData" / "Training") == "btcv"


def test_btcv_without_transunet_cases_has_empty_test(tmp_path):
    root = synapse_tree(tmp_path, ["0005", "0006", "0007", "0009", "0010"])
    m = from_btcv(root)
    assert m.splits["test"] == [] and len(m.splits["val"]) == 1
    assert_partition(m, {"0005", "0006", "0007", "0009", "0010"})


def test_btcv_missing_pairs(tmp_path):
    root = synapse_tree(tmp_path, ["0001", "0002"])
    (root / "RawData/Training/label/label0002.nii.gz").unlink()
    with pytest.raises(CimisError, match="img0002.nii.gz has no matching label"):
        from_btcv(root)
    touch(root / "RawData/Training/label/label0002.nii.gz", root / "RawData/Training/label/label0003.nii.gz")
    with pytest.raises(CimisError, match="label0003.nii.gz has no matching image"):
        from_btcv(root)


def test_btcv_monai_dataset_json(tmp_path):
    def pair(i):
        return {"image": f"imagesTr/img{i}.nii.gz", "label": f"labelsTr/label{i}.nii.gz"}

    training, validation = [f"{i:04d}" for i in range(5, 15)], ["0001", "0002", "0003"]
    for i in training + validation:
        touch(tmp_path / pair(i)["image"], tmp_path / pair(i)["label"])
    touch(tmp_path / "imagesTs/img0061.nii.gz")
    (tmp_path / "dataset_0.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "spleen"},
        "training": [pair(i) for i in training],
        "validation": [pair(i) for i in validation],
        "test": ["imagesTs/img0061.nii.gz"],
    }))
    m = build_manifest("btcv", tmp_path)
    assert m.classes == btcv_classes()
    assert m.splits["test"] == validation and len(m.splits["val"]) == 2
    assert_partition(m, set(training + validation))
    assert m.splits["unlabelled"] == ["0061"] and m.case("0061").label is None
    assert m.case("0001").label == tmp_path / "labelsTr/label0001.nii.gz"
    assert detect_layout(tmp_path) == "btcv"

    (tmp_path / "labelsTr/label0005.nii.gz").unlink()
    with pytest.raises(CimisError, match="label0005.nii.gz listed in .*dataset_0.json does not exist"):
        from_btcv(tmp_path)


def test_btcv_case_loads(tmp_path, make_image):
    """A Synapse tree with real tiny volumes goes through load_case."""
    root = tmp_path / "btcv"
    label = np.zeros((8, 10, 12), np.uint8)
    label[2:5, 2:5, 2:5] = 6
    write_image(make_image(), root / "RawData/Training/img/img0001.nii.gz")
    write_image(make_image(label), root / "RawData/Training/label/label0001.nii.gz")
    m = from_btcv(root)
    image, lab = load_case(m.case("0001"), m.classes)
    assert same_geometry(image, lab) and sitk.GetArrayViewFromImage(lab).max() == 6


# --------------------------------------------------------------------------------------------- WORD


def word_tree(root: Path, test_labels: bool) -> Path:
    for folder, ids in (("Tr", [1, 2, 3, 4]), ("Val", [5, 6]), ("Ts", [7, 8])):
        for i in ids:
            touch(root / f"images{folder}" / f"word_{i:04d}.nii.gz")
            if folder != "Ts" or test_labels:
                touch(root / f"labels{folder}" / f"word_{i:04d}.nii.gz")
    return root


@pytest.mark.parametrize("test_labels", [True, False])
def test_word_layout(tmp_path, test_labels):
    m = from_word(word_tree(tmp_path, test_labels))
    assert m.classes == word_classes()
    assert m.splits == {
        "train": ["word_0001", "word_0002", "word_0003", "word_0004"],
        "val": ["word_0005", "word_0006"],
        "test": ["word_0007", "word_0008"],
    }
    assert m.case("word_0005").label == tmp_path / "labelsVal" / "word_0005.nii.gz"
    assert (m.case("word_0007").label is not None) == test_labels
    assert detect_layout(tmp_path) == "word"


def test_word_missing_pairs(tmp_path):
    root = word_tree(tmp_path, test_labels=True)
    (root / "labelsVal" / "word_0006.nii.gz").unlink()
    with pytest.raises(CimisError, match="imagesVal/word_0006.nii.gz has no matching label"):
        from_word(root)
    (root / "imagesTs" / "word_0008.nii.gz").unlink()
    touch(root / "labelsVal" / "word_0006.nii.gz")
    with pytest.raises(CimisError, match="labelsTs/word_0008.nii.gz has no matching image"):
        from_word(root)


# --------------------------------------------------------------------------------------------- Decathlon


def decathlon_tree(root: Path, n: int = 20) -> Path:
    training = [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in range(n)]
    test = [f"./imagesTs/liver_{i}.nii.gz" for i in range(n, n + 3)]
    for e in training:
        touch(root / e["image"], root / e["label"])
    touch(*(root / t for t in test))
    touch(root / "imagesTr" / "._liver_0.nii.gz")  # macOS resource forks ship in the MSD tarballs
    (root / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": n, "numTest": 3, "training": training, "test": test,
    }, indent=4))
    return root


def test_decathlon_layout(tmp_path):
    m = from_decathlon(decathlon_tree(tmp_path))
    assert m.name == "Liver"
    assert [(c.name, c.value) for c in m.classes] == [("liver", 1), ("cancer", 2)]
    assert len(m.splits["test"]) == 4 and len(m.splits["val"]) == 3 and len(m.splits["train"]) == 13
    assert_partition(m, {f"liver_{i}" for i in range(20)})
    assert m.splits["unlabelled"] == ["liver_20", "liver_21", "liver_22"]
    assert m.case("liver_3").image == tmp_path / "imagesTr" / "liver_3.nii.gz"
    assert m.case("liver_21").label is None
    assert from_decathlon(tmp_path).splits == m.splits
    assert detect_layout(tmp_path) == "decathlon"


def test_decathlon_errors(tmp_path):
    root = decathlon_tree(tmp_path)
    (root / "labelsTr" / "liver_4.nii.gz").unlink()
    with pytest.raises(CimisError, match="liver_4.nii.gz listed in .*dataset.json does not exist"):
        from_decathlon(root)
    (root / "dataset.json").write_text('{"labels": {"0": "background"}, "training": [}')
    with pytest.raises(CimisError, match="dataset.json is not valid JSON"):
        from_decathlon(root)


# --------------------------------------------------------------------------------------------- TotalSeg, dispatch


def test_totalseg_layout_on_fake_folder(tmp_path):
    touch(*(tmp_path / f for f in ("example_ct.nii.gz", "example_seg_total_v2.nii.gz", "example_seg_total_v1.nii.gz")))
    m = build_manifest("totalseg", tmp_path, version="v1")
    assert m.splits["test"] == ["totalseg_example"] and "v1" in m.name and "not manual ground truth" in m.name
    case = m.case("totalseg_example")
    assert case.label == tmp_path / "example_seg_total_v1.nii.gz" and case.label_map[42] == 5
    assert from_totalseg_example(tmp_path).case("totalseg_example").label_map[52] == 8  # v2 aorta
    assert detect_layout(tmp_path) == "totalseg"
    with pytest.raises(CimisError, match="unknown TotalSegmentator label version"):
        from_totalseg_example(tmp_path, version="v3")


def test_dispatch_errors(tmp_path):
    with pytest.raises(CimisError, match="unknown dataset layout 'kits'"):
        build_manifest("kits", tmp_path)
    with pytest.raises(CimisError, match="bad option for the word adapter"):
        build_manifest("word", word_tree(tmp_path / "w", True), seed=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CimisError, match="matches no known dataset layout") as info:
        detect_layout(tmp_path / "empty")
    assert "decathlon" in info.value.hint
    with pytest.raises(CimisError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


@pytest.mark.skipif(not TOTALSEG_EXAMPLE.is_dir(), reason="shared/data/totalseg_example is not next to the repository")
def test_real_totalseg_example_loads_with_btcv_labels(tmp_path):
    m = from_totalseg_example(TOTALSEG_EXAMPLE)
    assert detect_layout(TOTALSEG_EXAMPLE) == "totalseg"
    image, label = load_case(m.case("totalseg_example"), m.classes)
    values, counts = np.unique(sitk.GetArrayViewFromImage(label), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    assert found.pop(0) > 0
    assert found == README_V2_VOXELS  # 12 organs, no esophagus
    ct = read_image(TOTALSEG_EXAMPLE / "example_ct.nii.gz")
    assert image.GetSize() == (122, 101, 112)
    for a in (image, label):
        assert a.GetSize() == ct.GetSize() and a.GetSpacing() == ct.GetSpacing()
        assert a.GetOrigin() == ct.GetOrigin() and a.GetDirection() == ct.GetDirection()
    # The manifest survives a save/load round trip from another folder.
    assert Manifest.load(m.save(tmp_path / "m.json")).cases == m.cases
