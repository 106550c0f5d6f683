"""Reading nnU-Net v2 trained-model folders (cimis.model.nnunet_source).

Each test writes a tiny nnU-Net v2 folder the way nnU-Net does: plans.json and dataset.json, and
fold_N/checkpoint_final.pth saved like nnUNetTrainer.save_checkpoint (network weights of a
dynamic_network_architectures network trained with deep supervision, the SGD optimizer's state, the
training log with numpy float scalars, init_args with a torch.device, ...).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dynamic_network_architectures")
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402

from cimis.errors import CimisError  # noqa: E402
from cimis.model.nnunet_source import build_network, is_nnunet_folder, read_nnunet, size_divisor  # noqa: E402

LABELS = {"background": 0, "liver": 1, "spleen": 2, "left kidney": 3}
# Anisotropic, as nnU-Net plans CT: in-plane kernels and strides only at the first stages (numpy (z, y, x)).
KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
SPACING_ZYX = [2.5, 0.8, 0.7]
PATCH_ZYX = [8, 16, 12]
CT_STATS = {"max": 3071.0, "mean": 97.3, "median": 102.0, "min": -1024.0, "percentile_00_5": -958.0,
            "percentile_99_5": 1093.0, "std": 137.1}


def _arch_kwargs(residual: bool = False) -> dict:
    kwargs = {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": KERNELS, "strides": STRIDES,
        ("n_blocks_per_stage" if residual else "n_conv_per_stage"): [1, 2, 2] if residual else [2, 2, 2],
        "n_conv_per_stage_decoder": [1, 1] if residual else [2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return kwargs


def _plans(residual: bool = False, transpose: list[int] | None = None, spacing_zyx=SPACING_ZYX,
           patch_zyx=PATCH_ZYX) -> dict:
    transpose = transpose or [0, 1, 2]
    name = "ResidualEncoderUNet" if residual else "PlainConvUNet"
    return {
        "dataset_name": "Dataset042_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing_zyx[t] for t in transpose],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": transpose,
        "transpose_backward": [transpose.index(i) for i in range(3)],
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [16, 12], "spacing": [0.8, 0.7],
                   "normalization_schemes": ["CTNormalization"]},
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": [patch_zyx[t] for t in transpose],
                "median_image_size_in_voxels": [40, 64, 64], "spacing": [spacing_zyx[t] for t in transpose],
                "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "architecture": {
                    "network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
                    "arch_kwargs": _arch_kwargs(residual),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": True,
            },
            "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [5.0, 1.6, 1.4], "next_stage": "3d_cascade"},
        },
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_STATS},
    }


def _dataset(labels: dict | None = None) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": labels or LABELS, "numTraining": 3, "file_ending": ".nii.gz"}


def _source_network(residual: bool = False, num_classes: int = len(LABELS)) -> torch.nn.Module:
    """The network as nnU-Net trains it (deep supervision on), with weights far from their initial values."""
    torch.manual_seed(0)
    common = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
                  kernel_sizes=KERNELS, strides=STRIDES, num_classes=num_classes, conv_bias=True,
                  norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if residual:
        net = ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1], **common)
    else:
        net = PlainConvUNet(n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2], **common)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def _checkpoint(net: torch.nn.Module, plans: dict, dataset: dict, fold: int = 0) -> dict:
    """A checkpoint with the keys and value types of nnUNetTrainer.save_checkpoint."""
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    outputs = net(torch.randn(1, 1, *PATCH_ZYX))
    sum(o.float().mean() for o in outputs).backward()
    optimizer.step()
    optimizer.zero_grad()
    now = time.time()
    logging = {"mean_fg_dice": [np.float64(0.41)], "ema_fg_dice": [np.float64(0.41)],
               "dice_per_class_or_region": [[np.float64(0.5), np.float64(0.3), np.float64(0.42)]],
               "train_losses": [np.float32(-0.21)], "val_losses": [np.float32(-0.18)], "lrs": [0.01],
               "epoch_start_timestamps": [now - 60.0], "epoch_end_timestamps": [now]}
    return {
        "network_weights": net.state_dict(), "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
        "logging": logging, "_best_ema": np.float64(0.41), "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def _write_folder(root: Path, residual: bool = False, transpose: list[int] | None = None, folds=(0,),
                  checkpoint_name: str = "checkpoint_final.pth", **plans_changes) -> tuple[Path, torch.nn.Module]:
    folder = root / "Dataset042_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    plans, dataset = _plans(residual, transpose, **plans_changes), _dataset()
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    net = _source_network(residual)
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save(_checkpoint(net, plans, dataset, fold), folder / f"fold_{fold}" / checkpoint_name)
    return folder, net


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return _write_folder(tmp_path_factory.mktemp("nnunet"))


def _reference_logits(net: torch.nn.Module, volume_xyz: np.ndarray, transpose: list[int]) -> np.ndarray:
    """nnU-Net's own forward: SimpleITK's (z, y, x) array, transposed by transpose_forward; logits back in (x, y, z)."""
    reference = copy.deepcopy(net).eval()
    reference.decoder.deep_supervision = False
    array = volume_xyz.transpose(2, 1, 0).transpose(transpose)
    with torch.no_grad():
        logits = reference(torch.from_numpy(np.ascontiguousarray(array))[None, None])[0].numpy()
    backward = [transpose.index(i) for i in range(3)]
    return logits.transpose(0, *[b + 1 for b in backward]).transpose(0, 3, 2, 1)


def _imported_logits(source, volume_xyz: np.ndarray) -> np.ndarray:
    network = build_network(source.builder, source.args).eval()
    network.load_state_dict(source.state_dict)
    with torch.no_grad():
        return network(torch.from_numpy(volume_xyz)[None, None])[0].numpy()


# ------------------------------------------------------------------------------------------- reading
def test_reads_classes_spacing_normalization_and_fold(tiny):
    folder, _ = tiny
    assert is_nnunet_folder(folder)
    source = read_nnunet(folder)
    assert source.kind == "nnunet" and source.builder == "nnunet.PlainConvUNet"
    assert source.class_names == ["liver", "spleen", "left kidney"] and source.label_values == [1, 2, 3]
    assert source.spacing == [0.7, 0.8, 2.5]  # (x, y, z): plans hold nnU-Net's (z, y, x)
    assert source.patch_size == [12, 16, 8]
    assert source.orientation == ""
    assert source.normalization == {"kind": "clip_zscore", "clip": [-958.0, 1093.0], "mean": 97.3, "std": 137.1}
    assert source.final_conv == "network.decoder.seg_layers.1"
    assert any("fold 0" in note and "only fold" in note for note in source.notes)
    json.dumps(source.args)  # plain JSON, as the card stores it
    assert source.args["conv_op"] == "Conv3d" and source.args["num_classes"] == 4
    final = build_network(source.builder, source.args).get_submodule(source.final_conv)
    assert isinstance(final, torch.nn.Conv3d) and final.kernel_size == (1, 1, 1) and final.out_channels == 4


@pytest.mark.parametrize("transpose", [[0, 1, 2], [2, 0, 1]])
def test_imported_network_equals_nnunets_forward(tmp_path, transpose):
    folder, net = _write_folder(tmp_path, transpose=transpose)
    source = read_nnunet(folder)
    assert source.spacing == [0.7, 0.8, 2.5] and source.patch_size == [12, 16, 8]
    # The network halves its first axis once, the others twice: that is z, or x after transpose_forward [2, 0, 1].
    assert size_divisor(source.args) == ([4, 4, 2] if transpose == [0, 1, 2] else [2, 4, 4])
    volume = np.random.default_rng(1).normal(size=source.patch_size).astype(np.float32)
    imported = _imported_logits(source, volume)
    reference = _reference_logits(net, volume, transpose)
    assert imported.shape == (4, *source.patch_size)
    np.testing.assert_allclose(imported, reference, rtol=1e-4, atol=1e-5)
    # Not a trivial agreement: feeding the volume without our axis permutation gives other logits.
    assert not np.allclose(imported, _reference_logits(net, volume.transpose(2, 1, 0).copy(), [0, 1, 2])
                           .transpose(0, 3, 2, 1), atol=1e-3)


def test_residual_encoder_unet(tmp_path):
    folder, net = _write_folder(tmp_path, residual=True)
    source = read_nnunet(folder)
    assert source.builder == "nnunet.ResidualEncoderUNet"
    volume = np.random.default_rng(2).normal(size=source.patch_size).astype(np.float32)
    np.testing.assert_allclose(_imported_logits(source, volume), _reference_logits(net, volume, [0, 1, 2]),
                               rtol=1e-4, atol=1e-5)


def test_old_plans_format(tmp_path):
    """Plans written before the 'architecture' entry (UNet_class_name, n_conv_per_stage_encoder, ...)."""
    folder, net = _write_folder(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    del config["architecture"]
    config.update({"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4, "unet_max_num_features": 16,
                   "n_conv_per_stage_encoder": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
                   "num_pool_per_axis": [1, 2, 2], "pool_op_kernel_sizes": STRIDES, "conv_kernel_sizes": KERNELS})
    (folder / "plans.json").write_text(json.dumps(plans))
    source = read_nnunet(folder)
    assert source.args["features_per_stage"] == [4, 8, 16]
    assert source.orientation == ""
    volume = np.random.default_rng(3).normal(size=source.patch_size).astype(np.float32)
    np.testing.assert_allclose(_imported_logits(source, volume), _reference_logits(net, volume, [0, 1, 2]),
                               rtol=1e-4, atol=1e-5)


def test_fold_choice_prefixes_and_best_checkpoint(tmp_path):
    folder, _ = _write_folder(tmp_path, folds=(3, 1))
    source = read_nnunet(folder)
    assert any("folds present: 1, 3; using fold 1" in note for note in source.notes)
    assert read_nnunet(folder, fold=3).notes[0].startswith("nnU-Net resamples")  # named: no fold note
    with pytest.raises(CimisError, match=r"no fold_0/checkpoint_final.pth.*folds present: 1, 3"):
        read_nnunet(folder, fold=0)
    # A checkpoint of a torch.compile'd network under DataParallel; only checkpoint_best.pth in fold 1.
    path = folder / "fold_1" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["network_weights"] = {f"module._orig_mod.{k}": v for k, v in checkpoint["network_weights"].items()}
    torch.save(checkpoint, folder / "fold_1" / "checkpoint_best.pth")
    path.unlink()
    source = read_nnunet(folder, fold=1)
    assert any("using checkpoint_best.pth" in note for note in source.notes)
    assert all(k.startswith("network.encoder.") or k.startswith("network.decoder.") for k in source.state_dict)


def test_configuration_inheritance(tiny):
    folder, _ = tiny
    source = read_nnunet(folder, configuration="3d_lowres")
    assert source.spacing == [1.4, 1.6, 5.0] and source.builder == "nnunet.PlainConvUNet"


# -------------------------------------------------------------------------------------------- refusals
def test_pickle_payload_is_refused_and_not_run(tmp_path):
    folder, _ = _write_folder(tmp_path)
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["logging"]["lrs"].append(Payload())
    torch.save(checkpoint, path)
    # The payload is live: plain unpickling runs it.
    torch.load(path, weights_only=False)["logging"]["lrs"][-1].close()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CimisError, match=r"checkpoint_final.pth: holds Python objects .*\(io.open\); refused, nothing "
                                         r"from the file was run"):
        read_nnunet(folder)
    assert not marker.exists()


def _edit_json(folder: Path, name: str, edit) -> None:
    data = json.loads((folder / name).read_text())
    edit(data)
    (folder / name).write_text(json.dumps(data))


def test_bad_folders_name_the_file_and_key(tmp_path):
    folder, _ = _write_folder(tmp_path)
    config = "configurations.3d_fullres"
    cases = [
        ("dataset.json", lambda d: d["labels"].update({"kidneys": [3, 4]}), r"dataset.json: labels.kidneys is a region"),
        ("dataset.json", lambda d: d["labels"].pop("spleen"), r"dataset.json: label values \[0, 1, 3\] are not consec"),
        ("dataset.json", lambda d: d.update(channel_names={"0": "CT", "1": "PET"}), r"dataset.json: channel_names"),
        ("plans.json", lambda d: d["configurations"]["3d_fullres"]["architecture"].update(
            network_class_name="my_lab.networks.FancyUNet"),
         rf"plans.json: {config}.architecture.network_class_name is 'my_lab.networks.FancyUNet'; supported"),
        ("plans.json", lambda d: d["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(
            nonlin="os.system"), rf"plans.json: {config}.architecture.arch_kwargs.nonlin is 'os.system', not one of"),
        ("plans.json", lambda d: d["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"]),
         rf"plans.json: {config}.normalization_schemes is 'ZScoreNormalization'; only CTNormalization"),
        ("plans.json", lambda d: d.pop("foreground_intensity_properties_per_channel"),
         r"plans.json: foreground_intensity_properties_per_channel.0 missing"),
    ]
    for name, edit, message in cases:
        original = (folder / name).read_text()
        _edit_json(folder, name, edit)
        with pytest.raises(CimisError, match=message):
            read_nnunet(folder)
        (folder / name).write_text(original)
    with pytest.raises(CimisError, match=r"plans.json: no configuration '2d_huge'.*present: 2d, 3d_fullres"):
        read_nnunet(folder, configuration="2d_huge")
    with pytest.raises(CimisError, match=r"plans.json: configurations.2d.spacing must be three numbers.*only 3D"):
        read_nnunet(folder, configuration="2d")
    _edit_json(folder, "plans.json", lambda d: d["configurations"].update(
        {"3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}))
    with pytest.raises(CimisError, match=r"plans.json: configurations.3d_cascade_fullres is the second stage of a "
                                         r"cascade"):
        read_nnunet(folder, configuration="3d_cascade_fullres")
    # Weights of another network: dataset.json names 4 foreground classes, the checkpoint has 3.
    _edit_json(folder, "dataset.json", lambda d: d["labels"].update({"pancreas": 4}))
    with pytest.raises(CimisError, match=r"checkpoint_final.pth: the weights do not match .* of another shape"):
        read_nnunet(folder)
    # A network of another trainer: the refusal names it.
    _edit_json(folder, "dataset.json", lambda d: d["labels"].pop("pancreas"))
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerMedNeXt"
    checkpoint["network_weights"]["decoder.extra_block.weight"] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(CimisError, match=r"1 unexpected \(first: network.decoder.extra_block.weight\)") as refused:
        read_nnunet(folder)
    assert "trained by nnUNetTrainerMedNeXt" in refused.value.one_line()
    (folder / "plans.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CimisError, match=r"plans.json: nested too deeply"):
        read_nnunet(folder)
    (folder / "plans.json").write_text("{\"configurations\": ")
    with pytest.raises(CimisError, match=r"plans.json: not valid JSON"):
        read_nnunet(folder)
    (folder / "plans.json").unlink()
    with pytest.raises(CimisError, match=r"plans.json: missing"):
        read_nnunet(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "plans.json").write_text(json.dumps(_plans()))
    (empty / "dataset.json").write_text(json.dumps(_dataset()))
    with pytest.raises(CimisError, match=r"empty: no fold_N/checkpoint_final.pth"):
        read_nnunet(empty)
    (empty / "fold_0").mkdir()
    (empty / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CimisError, match=r"checkpoint_final.pth: not a readable PyTorch checkpoint"):
        read_nnunet(empty)


def test_build_network_refuses_card_arguments_it_cannot_trust(tiny, monkeypatch):
    folder, _ = tiny
    args = read_nnunet(folder).args
    bad = copy.deepcopy(args)
    bad["conv_op"] = "torch.nn.modules.conv.Conv3d"  # dotted names are never imported
    with pytest.raises(CimisError, match=r"conv_op is 'torch.nn.modules.conv.Conv3d', not one of Conv3d"):
        build_network("nnunet.PlainConvUNet", bad)
    bad = copy.deepcopy(args)
    bad["features_per_stage"] = [4, 8, 10**6]
    with pytest.raises(CimisError, match=r"features_per_stage must be a list of 3 integers from 1 to 1024"):
        build_network("nnunet.PlainConvUNet", bad)
    bad = copy.deepcopy(args)
    bad["norm_op"] = ["InstanceNorm3d"]
    with pytest.raises(CimisError, match=r"norm_op is \"\['InstanceNorm3d'\]\", not one of"):
        build_network("nnunet.PlainConvUNet", bad)
    bad = copy.deepcopy(args)
    bad["n_conv_per_stage"] = None  # required, not optional
    with pytest.raises(CimisError, match=r"n_conv_per_stage must be a list of 3 integers"):
        build_network("nnunet.PlainConvUNet", bad)
    with pytest.raises(CimisError, match=r"unknown nnU-Net network 'nnunet.Primus'"):
        build_network("nnunet.Primus", args)
    monkeypatch.setitem(__import__("sys").modules, "dynamic_network_architectures.architectures.unet", None)
    with pytest.raises(CimisError, match=r"dynamic_network_architectures") as refused:
        build_network("nnunet.PlainConvUNet", args)
    assert 'pip install "cimis[nnunet]"' in refused.value.one_line()


# ------------------------------------------------------------------------------------ end to end
def _ct(spacing_xyz=(0.7, 0.8, 2.5), size_xyz=(20, 26, 10), seed=0):
    """A CT-like volume (HU) on an axis-aligned grid at the plans' spacing: air, a body, three blobs."""
    from .conftest import ct_volume

    return ct_volume(size_xyz, seed, spacing_xyz, origin=(-10.0, 20.0, 5.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _nnunet_logits(net: torch.nn.Module, image) -> torch.Tensor:
    """nnU-Net's way on a CT already at the plans' spacing: CTNormalization of SimpleITK's (z, y, x) array,
    then the network over sliding windows of the plans' patch (MONAI's Gaussian stitching, as cimis segment)."""
    import SimpleITK as sitk
    from monai.inferers import sliding_window_inference

    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array = (np.clip(array, CT_STATS["percentile_00_5"], CT_STATS["percentile_99_5"]) - CT_STATS["mean"]) / CT_STATS["std"]
    reference = copy.deepcopy(net).eval()
    reference.decoder.deep_supervision = False
    with torch.no_grad():
        return sliding_window_inference(torch.from_numpy(array)[None, None], roi_size=PATCH_ZYX, sw_batch_size=2,
                                        predictor=reference, overlap=0.25, mode="gaussian")[0]


def test_import_model_then_segment_agrees_with_nnunets_forward(tmp_path):
    import SimpleITK as sitk

    from cimis.cli import main

    folder, net = _write_folder(tmp_path / "source")
    image = _ct()
    # Shift the final biases so that every class wins somewhere on this CT (random weights would predict one).
    with torch.no_grad():
        logits = _nnunet_logits(net, image)
        net.decoder.seg_layers[-1].bias.sub_(torch.stack([logits[c].median() for c in range(len(LABELS))]))
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["network_weights"] = net.state_dict()
    torch.save(checkpoint, path)
    theirs = _nnunet_logits(net, image)
    assert len(theirs.argmax(0).unique()) == len(LABELS), "every class must be predicted for the check to mean anything"
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))

    for keep, channels in ((None, [0, 1, 2, 3]), ("spleen,liver", [0, 1, 2])):
        model = tmp_path / f"model_{len(channels)}"
        assert main(["import-model", str(folder), "--out", str(model)] + (["--classes", keep] if keep else [])) == 0
        card = json.loads((model / "card.json").read_text())
        assert card["network"]["builder"] == "nnunet.PlainConvUNet"
        assert [c["name"] for c in card["classes"]] == [n for n in LABELS if LABELS[n] in channels[1:]]
        assert card["preprocessing"]["spacing"] == [0.7, 0.8, 2.5] and card["preprocessing"]["orientation"] == ""
        assert card["network"]["divisor"] == [4, 4, 2]
        seg = tmp_path / f"seg_{len(channels)}.nii.gz"
        assert main(["segment", "--model", str(model), "--input", str(tmp_path / "ct.nii.gz"), "--output", str(seg),
                     "--device", "cpu"]) == 0
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        # The dropped channels' voxels are background: the argmax over the kept channels only.
        expected = np.array(channels)[theirs[channels].argmax(0).numpy()]
        assert ours.shape == expected.shape
        agreement = float((ours == expected).mean())
        assert agreement >= 0.999, agreement


def test_import_model_refuses_a_bad_nnunet_folder_and_writes_nothing(tmp_path, capsys):
    from cimis.cli import main

    folder, _ = _write_folder(tmp_path / "source", folds=(0, 2))
    _edit_json(folder, "dataset.json", lambda d: d["labels"].update({"kidneys": [3, 1]}))
    assert main(["import-model", str(folder), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dataset.json: labels.kidneys is a region" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()
    _edit_json(folder, "dataset.json", lambda d: d["labels"].pop("kidneys"))
    assert main(["import-model", str(folder), "--out", str(tmp_path / "model"), "--fold", "1"]) == 2
    assert "folds present: 0, 2" in capsys.readouterr().err and not (tmp_path / "model").exists()
    assert main(["import-model", str(folder), "--out", str(tmp_path / "model"), "--fold", "2"]) == 0
    assert "note: folds present" not in capsys.readouterr().out  # a named fold needs no note
    assert main(["import-model", str(folder), "--out", str(tmp_path / "model2")]) == 0
    assert "note: folds present: 0, 2; using fold 0" in capsys.readouterr().out


def test_orientation_of_reorienting_readers_and_totalsegmentator(tiny, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny[0], folder)
    _edit_json(folder, "plans.json", lambda d: d.update(image_reader_writer="NibabelIOWithReorient"))
    assert read_nnunet(folder).orientation == "RAS"
    _edit_json(folder, "plans.json", lambda d: d.update(image_reader_writer="SimpleITKIO",
                                                        dataset_name="Dataset291_TotalSegmentator_part1_organs_1559subj"))
    source = read_nnunet(folder)
    assert source.orientation == "RAS" and any("TotalSegmentator reorients" in n for n in source.notes)


def test_an_imported_nnunet_model_learns_a_new_organ(tmp_path):
    """Version 0 from nnU-Net: pgcd-dapd adds an organ (2 iterations on phantoms) through the axis wrapper."""
    import SimpleITK as sitk

    from cimis.data.manifest import Manifest
    from cimis.data.phantom import write_phantom_dataset
    from cimis.incremental.learn import learn_step
    from cimis.infer import segment_image
    from cimis.model.import_command import import_model
    from cimis.model.modelfile import load_model, load_prototypes
    from cimis.train import TrainConfig

    # No validation case: validating is most of a 2-iteration step's time.
    manifest = Manifest.load(write_phantom_dataset(tmp_path / "ds", num_cases=2, spacing=(8.0, 8.0, 8.0), seed=5,
                                                   val_cases=0, test_cases=1, progress=False))
    folder, _ = _write_folder(tmp_path / "source", spacing_zyx=[16.0, 16.0, 16.0], patch_zyx=[16, 16, 16])
    model, _ = import_model(folder, tmp_path / "imported")
    config = TrainConfig(iterations=2, device="cpu", val_every=2, checkpoint_every=2, learning_rate=1e-5)
    new_model = learn_step(model, manifest, tmp_path / "step", new_classes=["stomach"], strategy="pgcd-dapd",
                           config=config, progress=False)
    net, card = load_model(new_model)
    assert card.classes.names == ["liver", "spleen", "left kidney", "stomach"]
    assert card.network.builder == "nnunet.PlainConvUNet" and net.num_channels == 5
    bank, _ = load_prototypes(new_model, card)
    assert bank.shape == (5, 4)  # D = the 4 features of the finest decoder stage, the final conv's input
    image = sitk.ReadImage(str(manifest.cases_in("test")[0].image))
    labels = sitk.GetArrayFromImage(segment_image(net, card, image, device="cpu").label)
    assert labels.shape == sitk.GetArrayFromImage(image).shape and set(np.unique(labels)) <= {0, *card.classes.values}
