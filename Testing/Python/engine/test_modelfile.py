"""Model folders: safetensors + JSON card round trip; corrupted, foreign and pickle files are refused."""

import contextlib
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from cimis.data.classes import ClassInfo, btcv_classes
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.model.modelfile import ModelCard, load_card, load_model, save_model
from cimis.model.network import NetworkConfig, SegmentationNet

CONFIG = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(1)
    classes = btcv_classes()
    net = SegmentationNet(CONFIG, classes.num_channels)
    card = ModelCard(classes, CONFIG, PreprocessConfig(spacing=[4.0, 4.0, 4.0], patch_size=[16, 16, 16]),
                     history=[{"step": 0, "kind": "train"}], metrics={"mean_dice": 0.5})
    return save_model(tmp_path / "model", net, card), net, card


def test_round_trip_gives_the_same_network_and_card(saved):
    folder, net, card = saved
    loaded, loaded_card = load_model(folder)
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(x), net.eval()(x))
    assert loaded_card.classes == card.classes
    assert loaded_card.network == CONFIG
    assert loaded_card.preprocessing.spacing == [4.0, 4.0, 4.0]
    assert loaded_card.history == [{"step": 0, "kind": "train"}]
    assert [c["color"] for c in json.loads((folder / "card.json").read_text())["classes"]][0] == list(card.classes[0].color)


def test_grown_model_round_trip(tmp_path, saved):
    folder, net, card = saved
    net.head.grow(2)
    card.classes = card.classes.extended([ClassInfo("duodenum", 20, None), ClassInfo("colon", 21, None)])
    loaded, loaded_card = load_model(save_model(tmp_path / "grown", net, card))
    assert loaded.num_channels == 16 and loaded_card.classes.names[-1] == "colon"


def test_refuses_to_overwrite(saved):
    folder, net, card = saved
    with pytest.raises(CimisError, match="already exists"):
        save_model(folder, net, card)


def test_tampered_weights_fail_the_checksum(saved):
    folder, _, _ = saved
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(CimisError, match="checksum"):
        load_model(folder)


def test_truncated_weights_are_refused(saved):
    folder, _, _ = saved
    card = json.loads((folder / "card.json").read_text())
    card["checksums"] = {}  # even without a checksum to compare, a truncated file must not load
    (folder / "card.json").write_text(json.dumps(card))
    data = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CimisError, match="cannot be read as safetensors"):
        load_model(folder)


def test_corrupted_card_is_refused(saved):
    folder, _, _ = saved
    (folder / "card.json").write_text("{not json")
    with pytest.raises(CimisError, match="not valid JSON"):
        load_card(folder)


class _WritesAFile:
    """Unpickling this object would create a file: proof that a loader ran code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_WritesAFile(str(target))))
    with pytest.raises(CimisError, match="pickle"):
        load_model(evil)
    assert not target.exists()


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(CimisError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_replacing_a_model_leaves_the_new_one_whole_and_no_leftovers(saved):
    folder, net, card = saved
    card.history = [{"step": 0, "kind": "train"}, {"step": 1, "kind": "learn"}]
    save_model(folder, net, card, overwrite=True)
    assert load_card(folder).history[-1] == {"step": 1, "kind": "learn"}
    load_model(folder)  # the weights match the new card's checksums
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]


def test_overwrite_refuses_a_folder_that_is_not_a_model(saved, tmp_path):
    _, net, card = saved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes\n")
    with pytest.raises(CimisError, match="does not hold an earlier model folder"):
        save_model(mine, net, card, overwrite=True)
    assert (mine / "notes.txt").read_text() == "a user's notes\n"


@contextlib.contextmanager
def undeletable(folder):
    """Make the files of ``folder`` impossible to delete for this process: a read-only folder, or for root
    (whom permissions do not stop) the immutable attribute of a file. Yields the undo."""
    if os.name != "posix":
        pytest.skip("needs POSIX permissions or file attributes")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield lambda place: place.chmod(0o755)
        return
    target = folder / "card.json"
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(target)]).returncode != 0:
        pytest.skip("running as root on a file system without the immutable attribute: no way to make a "
                    "file undeletable")
    yield lambda place: subprocess.run(["chattr", "-i", str(place / "card.json")], check=True)


def test_a_failure_to_delete_the_old_model_does_not_lose_the_new_one(saved):
    folder, net, card = saved
    card.history = [{"step": 0, "kind": "train"}, {"step": 1, "kind": "learn"}]
    with undeletable(folder) as undo:
        try:
            save_model(folder, net, card, overwrite=True)
            assert load_card(folder).history[-1] == {"step": 1, "kind": "learn"}
            load_model(folder)
        finally:
            for place in [folder, *folder.parent.glob(".model.*.old")]:
                undo(place)
