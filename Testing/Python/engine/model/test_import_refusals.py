"""Bad sources are refused with one `error:` line naming file and key, exit status 2, nothing written and
nothing from the source executed; `--classes` keeps exactly the named channels."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cimis.cli import main
from cimis.model.modelfile import load_model

from .conftest import NETWORKS, make_network


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def refused(capsys, tmp_path, bundle, *extra) -> str:
    out = tmp_path / "imported"
    code, err = run(capsys, "import-model", bundle, "--out", out, *extra)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists(), "nothing may be written"
    return lines[0]


def test_an_expression_where_a_value_is_needed_is_refused_and_never_run(tmp_path, bundle_factory, capsys):
    marker = tmp_path / "PWNED"
    network = {"_target_": "SegResNet", **NETWORKS["SegResNet"],
               "out_channels": f"$open({str(marker)!r}, 'w').write('x') and 4"}
    line = refused(capsys, tmp_path, bundle_factory(inference_changes={"network_def": network}))
    assert "configs/inference.json" in line and "network_def::out_channels" in line and "expression" in line
    assert not marker.exists()


def test_expressions_the_import_does_not_need_are_never_evaluated(tmp_path, bundle_factory, capsys):
    marker = tmp_path / "PWNED"
    bundle = bundle_factory(inference_changes={"writer": f"$open({str(marker)!r}, 'w').write('x')",
                                               "initialize": ["$@writer"]})
    code, err = run(capsys, "import-model", bundle, "--out", tmp_path / "m")
    assert code == 0, err
    assert not marker.exists()


def test_a_spacing_given_only_as_an_expression_names_the_option_that_supplies_it(tmp_path, bundle_factory, capsys):
    bundle = bundle_factory(inference_changes={"spacing": "$[4.0] * 3"})
    line = refused(capsys, tmp_path, bundle)
    assert "preprocessing::transforms::3::pixdim" in line and "--spacing" in line
    code, err = run(capsys, "import-model", bundle, "--out", tmp_path / "m", "--spacing", "4")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "card.json").read_text())["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]


class Payload:
    """Unpickling this runs ``open(marker, 'w')``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_in_the_weights_is_refused_and_not_run(tmp_path, bundle_factory, capsys):
    marker = tmp_path / "PWNED"
    bundle = bundle_factory()
    state = make_network("SegResNet").state_dict()
    state["payload"] = Payload(marker)
    with open(bundle / "models" / "model.pt", "wb") as f:
        pickle.dump(state, f)
    line = refused(capsys, tmp_path, bundle)
    assert "models/model.pt" in line and "refused" in line
    assert not marker.exists()
    torch.save({"model": Payload(marker)}, bundle / "models" / "model.pt")  # the zip format too
    refused(capsys, tmp_path, bundle)
    assert not marker.exists()


@pytest.mark.parametrize("change, words", [
    ({"network_def": {"_target_": "BasicUNet", "spatial_dims": 3}}, ["network_def::_target_", "BasicUNet", "not supported"]),
    ({"network_def": {"_target_": "os.system", "command": "touch x"}}, ["network_def::_target_", "os.system"]),
    ({"network_def": {**{"_target_": "SegResNet"}, **NETWORKS["SegResNet"], "init_filters": 10**6}},
     ["network_def.init_filters", "from 1 to 256"]),
    ({"network_def": {**{"_target_": "SegResNet"}, **NETWORKS["SegResNet"], "blocks_down": "1,1,1"}},
     ["network_def.blocks_down"]),
    ({"preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Spacingd", "keys": "image", "pixdim": [4, 4, 4]},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}]}},
     ["NormalizeIntensityd", "not support", "--window"]),
    ({"inferer": {"_target_": "SimpleInferer"}}, ["roi_size", "--patch-size"]),
])
def test_unsupported_or_absurd_bundles_are_refused(tmp_path, bundle_factory, capsys, change, words):
    line = refused(capsys, tmp_path, bundle_factory(inference_changes=change))
    assert "configs/inference.json" in line
    for word in words:
        assert word in line, line


def test_weights_of_another_network_are_refused(tmp_path, bundle_factory, capsys):
    other = make_network("UNet")
    line = refused(capsys, tmp_path, bundle_factory(net=other))
    assert "models/model.pt" in line and "does not match" in line


def test_an_incomplete_bundle_is_refused(tmp_path, bundle_factory, capsys):
    bundle = bundle_factory()
    (bundle / "models" / "model.pt").unlink()
    assert "models/model.pt" in refused(capsys, tmp_path, bundle)
    (bundle / "configs" / "inference.json").unlink()
    assert "configs/inference.json" in refused(capsys, tmp_path, bundle)


def test_yaml_aliases_are_refused(tmp_path, bundle_factory, capsys):
    bundle = bundle_factory(fmt="yaml")
    text = (bundle / "configs" / "inference.yaml").read_text()
    (bundle / "configs" / "inference.yaml").write_text("a: &a [1, 2]\nb: [*a, *a]\n" + text)
    assert "aliases" in refused(capsys, tmp_path, bundle)


def test_an_unknown_class_name_is_refused(tmp_path, bundle_factory, capsys):
    line = refused(capsys, tmp_path, bundle_factory(), "--classes", "spleen,pancreas")
    assert "pancreas" in line and "liver" in line


def test_classes_keeps_exactly_the_named_channels(tmp_path, bundle_factory, capsys):
    net = make_network("SegResNet")
    code, err = run(capsys, "import-model", bundle_factory(net=net), "--out", tmp_path / "m", "--classes", "kidney,spleen")
    assert code == 0, err
    imported, card = load_model(tmp_path / "m")
    assert card.classes.names == ["spleen", "kidney"] and card.classes.values == [2, 3]
    source = net.conv_final[2].conv
    torch.testing.assert_close(imported.head.conv.weight, source.weight[[0, 2, 3]])
    torch.testing.assert_close(imported.head.conv.bias, source.bias[[0, 2, 3]])
    # Every voxel the full model gives to a kept class keeps it; the others move to a kept channel.
    from cimis.infer import segment_image

    from .conftest import ct_volume

    full_net, full_card = load_model(_import_all(capsys, net, tmp_path))
    image = ct_volume()
    full = sitk_array(segment_image(full_net, full_card, image, device="cpu").label)
    subset = sitk_array(segment_image(imported, card, image, device="cpu").label)
    kept = (full == 2) | (full == 3)
    assert kept.sum() > 100 and (subset[kept] == full[kept]).all()
    assert not (subset == 1).any()


def sitk_array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def _import_all(capsys, net, tmp_path):
    from .conftest import write_bundle

    bundle = write_bundle(tmp_path / "full_bundle", "SegResNet", net=net)
    assert run(capsys, "import-model", bundle, "--out", tmp_path / "full")[0] == 0
    return tmp_path / "full"


def test_a_card_with_absurd_imported_arguments_is_refused(tmp_path, bundle_factory, capsys):
    assert run(capsys, "import-model", bundle_factory(), "--out", tmp_path / "m")[0] == 0
    card_path = tmp_path / "m" / "card.json"
    card = json.loads(card_path.read_text())
    for field, value, words in (("init_filters", 2**40, "network.args.init_filters"),
                                ("blocks_down", [1] * 100, "network.args.blocks_down"),
                                ("exec", "print(1)", "network.args.exec")):
        changed = json.loads(json.dumps(card))
        changed["network"]["args"][field] = value
        card_path.write_text(json.dumps(changed))
        code, err = run(capsys, "segment", "--model", tmp_path / "m", "--input", "x.nii.gz", "--output", tmp_path / "s.nii.gz")
        assert code == 2 and words in err, err
    changed = json.loads(json.dumps(card))
    changed["preprocessing"]["normalization"] = {"kind": "clip_zscore", "clip": [-1000, 1000], "mean": 0, "std": 0}
    card_path.write_text(json.dumps(changed))
    code, err = run(capsys, "segment", "--model", tmp_path / "m", "--input", "x.nii.gz", "--output", tmp_path / "s.nii.gz")
    assert code == 2 and "preprocessing.normalization.std" in err, err


def test_a_bundle_without_class_names_takes_them_from_classes(tmp_path, bundle_factory, capsys):
    bundle = bundle_factory(metadata_changes={"network_data_format": {"outputs": {"pred": {"num_channels": 4}}}})
    line = refused(capsys, tmp_path, bundle)
    assert "configs/metadata.json" in line and "channel_def" in line and "--classes" in line
    code, err = run(capsys, "import-model", bundle, "--out", tmp_path / "m", "--classes", "a,b,c")
    assert code == 0, err
    assert load_model(tmp_path / "m")[1].classes.names == ["a", "b", "c"]


def test_a_bad_prototype_volume_is_refused_and_nothing_written(tmp_path, bundle_factory, capsys):
    (tmp_path / "notct.nii.gz").write_bytes(b"not an image")
    line = refused(capsys, tmp_path, bundle_factory(), "--volumes", tmp_path / "notct.nii.gz")
    assert "notct.nii.gz" in line


def test_overwrite_replaces_only_an_earlier_model_folder(tmp_path, bundle_factory, capsys):
    bundle = bundle_factory("UNet")
    user = tmp_path / "user"
    user.mkdir()
    (user / "scan.nii.gz").write_text("a user's file")
    assert main(["import-model", str(bundle), "--out", str(user), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "does not hold an earlier model folder" in err and "Traceback" not in err
    assert (user / "scan.nii.gz").read_text() == "a user's file"
    model = tmp_path / "model"
    assert main(["import-model", str(bundle), "--out", str(model)]) == 0
    assert main(["import-model", str(bundle), "--out", str(model)]) == 2  # only with --overwrite
    assert main(["import-model", str(bundle), "--out", str(model), "--overwrite"]) == 0
    assert load_model(model)[1].network.arch == "imported"
