"""`cimis export --format monai-bundle`: MONAI's bundle parser builds and runs the export without cimis code,
and its labels are those of `cimis segment`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cimis.cli import main
from cimis.data.classes import ClassSet
from cimis.data.preprocess import PreprocessConfig
from cimis.model.modelfile import ModelCard, save_model
from cimis.model.network import NetworkConfig, SegmentationNet

from .conftest import SPACING, WINDOW, ct_volume


def run_bundle_with_monai(bundle, image_path, output_dir) -> np.ndarray:
    """MONAI's ConfigParser instantiates the exported config (network, transforms, inferer, post-processing);
    only MONAI and torch code runs. Returns the saved label map as (z, y, x)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = str(output_dir)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(image_path)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    parser.get_parsed_content("postprocessing")(data)
    saved = list(output_dir.glob("*.nii.gz"))
    assert len(saved) == 1
    return sitk.GetArrayFromImage(sitk.ReadImage(str(saved[0])))


def own_model(tmp_path, arch: str):
    torch.manual_seed(1)
    config = (NetworkConfig(arch="unet", filters=[4, 8, 16], strides=[2, 2], kernel_sizes=[3]) if arch == "unet"
              else NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2]))
    net = SegmentationNet(config, 3).eval()
    with torch.no_grad():
        net.head.conv.weight.mul_(20)  # several classes win somewhere on the volume
    card = ModelCard(classes=ClassSet.from_names(["liver", "spleen"], first_value=5), network=config,
                     preprocessing=PreprocessConfig(spacing=SPACING, window=WINDOW, patch_size=[32, 32, 32]))
    return save_model(tmp_path / f"own-{arch}", net, card)


@pytest.mark.parametrize("source", ["SegResNet", "UNet", "own-unet", "own-dynunet"])
def test_the_exported_bundle_runs_in_monai_and_agrees_with_cimis_segment(tmp_path, bundle_factory, capsys, source):
    if source.startswith("own-"):
        model = own_model(tmp_path, source.split("-")[1])
    else:
        model = tmp_path / "model"
        # A subset: label values 2 and 3 on channels 1 and 2, so the exported label mapping is exercised.
        assert main(["import-model", str(bundle_factory(source)), "--out", str(model), "--classes", "spleen,kidney"]) == 0
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_volume(), str(image))
    assert main(["export", str(model), "--format", "monai-bundle", "--out", str(tmp_path / "bundle")]) == 0
    metadata = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    card = json.loads((model / "card.json").read_text())
    assert list(channel_def.values()) == ["background"] + [c["name"] for c in card["classes"]]
    assert "cimis" not in (tmp_path / "bundle" / "configs" / "inference.json").read_text().lower()
    theirs = run_bundle_with_monai(tmp_path / "bundle", image, tmp_path / "monai_out")
    assert main(["segment", "--model", str(model), "--input", str(image), "--output", str(tmp_path / "seg.nii.gz"),
                 "--device", "cpu"]) == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    assert ours.shape == theirs.shape
    assert len(np.unique(ours)) >= 2
    assert float((ours == theirs).mean()) >= 0.999
    # And back: the exported bundle imports as the same model (names, label values, labels).
    assert main(["import-model", str(tmp_path / "bundle"), "--out", str(tmp_path / "back")]) == 0
    back = json.loads((tmp_path / "back" / "card.json").read_text())
    assert [(c["name"], c["value"]) for c in back["classes"]] == [(c["name"], c["value"]) for c in card["classes"]]
    assert main(["segment", "--model", str(tmp_path / "back"), "--input", str(image), "--output",
                 str(tmp_path / "back.nii.gz"), "--device", "cpu"]) == 0
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "back.nii.gz")))
    assert float((again == ours).mean()) >= 0.999


def test_nnunet_networks_are_not_exported(tmp_path, capsys):
    from cimis.model.export_bundle import network_definition
    from cimis.errors import CimisError

    class Fake:
        config = NetworkConfig.imported("nnunet.PlainConvUNet", {"n_stages": 2, "features_per_stage": [4, 8],
                                        "strides": [1, 2]}, "x", 4, [2, 2, 2])

    class Head:
        class conv:
            weight = torch.zeros(2, 4, 1, 1, 1)
            bias = torch.zeros(2)

    fake = Fake()
    fake.head, fake.num_channels = Head(), 2
    with pytest.raises(CimisError, match="not a MONAI network"):
        network_definition(fake)


def test_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    model = own_model(tmp_path, "unet")
    export = ["export", str(model), "--format", "monai-bundle", "--out"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("a user's file")
    file_out = tmp_path / "bundle.txt"
    file_out.write_text("a user's file")
    for out in (user, file_out):
        assert main([*export, str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert (user / "notes.txt").read_text() == "a user's file" and file_out.read_text() == "a user's file"
    bundle = tmp_path / "bundle"
    assert main([*export, str(bundle)]) == 0
    assert main([*export, str(bundle)]) == 2  # an earlier export: replaced only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*export, str(bundle), "--overwrite"]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == ["LICENSE", "configs", "models"]
