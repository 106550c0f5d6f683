"""Time and peak memory to read and build an nnU-Net v2 model of TotalSegmentator's size, the figures of
docs/benchmarks.md ("Importing an nnU-Net v2 model of TotalSegmentator's size").

The model is a same-shaped stand-in with random weights (no download): a PlainConvUNet of TotalSegmentator's
3d_fullres plans (6 stages, 32..320 features, 3x3x3 kernels, 128^3 patch) with 117 classes plus background,
saved as nnU-Net's trainer saves it (network weights, SGD momentum buffers, training log). Each phase runs in
a fresh process so that its peak memory (``ru_maxrss``) is its own:

- ``read``: :func:`cimis.model.nnunet_source.read_nnunet` (JSON, safe checkpoint load, network built once
  to check the weights against it);
- ``build``: ``read`` plus :func:`build_network` and ``load_state_dict``, what ``cimis import-model`` does;
- ``import``: the whole ``cimis import-model`` without ``--volumes`` (read, build, load, head split, card
  checks, model folder written);
- ``forward`` (with ``--forward``): ``build`` plus one forward pass of one 128^3 patch without gradients.

    PYTHONPATH=CIMISLearner/Logic python Testing/Benchmarks/nnunet_import_size.py [--forward] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_CLASSES = 117
FEATURES = [32, 64, 128, 256, 320, 320]
PATCH_ZYX = [128, 128, 128]
SPACING_ZYX = [1.5, 1.5, 1.5]


def write_model(folder: Path) -> float:
    """Write the stand-in model folder; returns the checkpoint's size in MB."""
    import numpy as np
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(FEATURES)
    arch_kwargs = {
        "n_stages": n, "features_per_stage": FEATURES, "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    plans = {
        "dataset_name": "Dataset999_TotalSegmentatorSized", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "patch_size": PATCH_ZYX, "spacing": SPACING_ZYX, "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "batch_size": 2,
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 68.1, "std": 180.3, "percentile_00_5": -1004.0, "percentile_99_5": 1377.0}},
    }
    labels = {"background": 0, **{f"structure_{i:03d}": i for i in range(1, NUM_CLASSES + 1)}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1000, "file_ending": ".nii.gz"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    net = PlainConvUNet(1, n, FEATURES, torch.nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, NUM_CLASSES + 1, 2, True,
                        torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                        {"inplace": True}, deep_supervision=True)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    for p in net.parameters():  # momentum buffers, as after a training step
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    checkpoint = {
        "network_weights": net.state_dict(), "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.8)] * 4000, "ema_fg_dice": [np.float64(0.8)] * 4000,
                    "lrs": [0.01] * 4000},
        "_best_ema": np.float64(0.8), "current_epoch": 4000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainerNoMirroring", "inference_allowed_mirroring_axes": None,
    }
    (folder / "fold_0").mkdir(exist_ok=True)
    path = folder / "fold_0" / "checkpoint_final.pth"
    torch.save(checkpoint, path)
    return path.stat().st_size / 1e6


def peak_mb() -> float:
    """This process's peak resident memory. Linux's ``ru_maxrss`` survives ``exec``, so a child started by a
    parent that held the model would report the parent's peak; ``VmHWM`` starts afresh."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(phase: str, folder: Path) -> dict:
    """One phase in this process; returns seconds and peak resident memory."""
    import torch

    from cimis.model.nnunet_source import build_network, read_nnunet

    result = {"phase": phase, "threads": torch.get_num_threads(), "after_imports_mb": round(peak_mb())}
    if phase == "import":  # on its own: a read before it would leave its memory to the allocator
        from cimis.model.import_command import import_model

        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            import_model(folder, Path(out) / "model")
            result["import_s"] = round(time.perf_counter() - start, 2)
            result["model_mb"] = round(sum(f.stat().st_size for f in (Path(out) / "model").iterdir()) / 1e6)
        result["peak_mb"] = round(peak_mb())
        return result
    start = time.perf_counter()
    source = read_nnunet(folder)
    result["read_s"] = round(time.perf_counter() - start, 2)
    if phase in ("build", "forward"):
        start = time.perf_counter()
        network = build_network(source.builder, source.args)
        network.load_state_dict(source.state_dict)
        result["build_load_s"] = round(time.perf_counter() - start, 2)
        result["parameters_M"] = round(sum(p.numel() for p in network.parameters()) / 1e6, 1)
    if phase == "forward":
        network.eval()
        volume = torch.randn(1, 1, *source.patch_size)
        start = time.perf_counter()
        with torch.no_grad():
            logits = network(volume)
        result["forward_s"] = round(time.perf_counter() - start, 2)
        result["logits_shape"] = list(logits.shape)
    result["peak_mb"] = round(peak_mb())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", action="store_true", help="also time one forward pass of a 128^3 patch")
    parser.add_argument("--keep", type=Path, help="write the model folder here and keep it")
    parser.add_argument("--phase", choices=["read", "build", "import", "forward"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.folder)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "Dataset999_TotalSegmentatorSized" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        start = time.perf_counter()
        size_mb = write_model(folder)
        print(json.dumps({"phase": "write", "checkpoint_mb": round(size_mb), "s": round(time.perf_counter() - start, 1)}))
        for phase in ["read", "build", "import"] + (["forward"] if args.forward else []):
            out = subprocess.run([sys.executable, __file__, "--phase", phase, "--folder", str(folder)],
                                 check=True, capture_output=True, text=True).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
