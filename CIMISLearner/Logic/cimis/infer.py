"""Whole-volume inference: sliding windows in model space, class probabilities resampled onto the input grid.

The network runs on the resampled, windowed volume (model space). Its class probabilities are brought
back onto the input's own grid one class at a time with linear interpolation, keeping a running argmax, so
the output label map has the input's exact geometry and smooth boundaries, and memory stays at a few
copies of the input volume whatever the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from cimis.data.classes import label_dtype
from cimis.data.preprocess import PreprocessConfig, metatensor_to_sitk, model_space_transforms, sitk_to_metatensor
from cimis.data.validation import check_3d, check_finite, check_fits_in_memory
from cimis.device import autocast, resolve_device
from cimis.metrics import class_volumes_ml
from cimis.model.modelfile import ModelCard
from cimis.model.network import SegmentationNet


@torch.no_grad()
def predict_probabilities(
    net: SegmentationNet,
    image: torch.Tensor,
    patch_size,
    device: torch.device,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    amp: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities ``(C, X, Y, Z)`` (float32, CPU) for a model-space image ``(1, X, Y, Z)``.

    Windows run on ``device`` and are stitched on the CPU with Gaussian weighting, so a whole CT never has
    to fit in GPU memory.
    """
    was_training = net.training
    net.eval()
    x = torch.as_tensor(image).float()[None]
    with autocast(device, amp):
        logits = sliding_window_inference(
            x, roi_size=list(patch_size), sw_batch_size=sw_batch_size, predictor=net, overlap=overlap,
            mode="gaussian", sw_device=device, device="cpu", progress=progress,
        )
    net.train(was_training)
    return torch.softmax(torch.as_tensor(logits).float()[0], dim=0)


def estimate_inference_bytes(image: sitk.Image, card: ModelCard) -> int:
    """Rough peak memory of :func:`segment_image`: the stitched logits and weights in model space plus the
    input and a few working copies on the input grid."""
    size = np.array(image.GetSize(), dtype=np.float64)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    model_voxels = float(np.prod(size * spacing / np.array(card.preprocessing.spacing)))
    channels = card.classes.num_channels
    return int(model_voxels * 4 * (3 * channels + 4) + np.prod(size) * 4 * 5)


@dataclass
class Segmentation:
    """A label map of class values on the input's grid, and each class's volume in millilitres."""

    label: sitk.Image
    volumes_ml: dict[str, float]


def segment_image(
    net: SegmentationNet,
    card: ModelCard,
    image: sitk.Image,
    device: str | torch.device = "auto",
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    amp: bool = True,
    progress: bool = False,
    source: str = "input",
) -> Segmentation:
    """Segment a whole 3D CT; the result has exactly ``image``'s size, spacing, origin and direction."""
    check_3d(image, source)
    check_finite(image, source)
    check_fits_in_memory(
        estimate_inference_bytes(image, card), f"segmenting {source} ({'x'.join(map(str, image.GetSize()))} voxels)",
        "resample the volume to a coarser spacing or crop it to the abdomen first",
    )
    device = device if isinstance(device, torch.device) else resolve_device(device)
    net = net.to(device)
    model_space = model_space_transforms(card.preprocessing, with_label=False)({"image": sitk_to_metatensor(image)})
    probs = predict_probabilities(net, model_space["image"], card.preprocessing.patch_size, device,
                                  sw_batch_size, overlap, amp, progress)
    channels = resample_argmax(probs, model_space["image"].affine, image)
    values = card.classes.channels_to_values(channels)
    label = sitk.GetImageFromArray(values.astype(label_dtype(card.classes.values)))
    label.CopyInformation(image)
    return Segmentation(label, class_volumes_ml(values, image.GetSpacing()[::-1], card.classes))


def resample_argmax(probs: torch.Tensor, affine, reference: sitk.Image) -> np.ndarray:
    """Argmax over classes of ``probs`` (model space) linearly resampled onto ``reference``'s grid.

    Returns channel indices as a ``(z, y, x)`` array in SimpleITK's order. Voxels of the reference outside
    the model-space grid get background.
    """
    best_prob = best_channel = None
    for c in range(probs.shape[0]):
        channel = metatensor_to_sitk(probs[c], affine)
        outside = 1.0 if c == 0 else 0.0
        resampled = sitk.GetArrayFromImage(
            sitk.Resample(channel, reference, sitk.Transform(), sitk.sitkLinear, outside, sitk.sitkFloat32)
        )
        if best_prob is None:
            best_prob, best_channel = resampled, np.zeros(resampled.shape, dtype=np.int64)
        else:
            better = resampled > best_prob
            best_prob[better] = resampled[better]
            best_channel[better] = c
    return best_channel


def segment_file(
    model_dir: str | Path, input_path: str | Path, output_path: str | Path, device: str = "auto",
    overwrite: bool = False, progress: bool = False,
) -> Segmentation:
    """Read a volume (file or DICOM folder), segment it with a model folder, write the label map."""
    from cimis.data.io import read_image, write_image
    from cimis.model.modelfile import load_model

    net, card = load_model(model_dir)
    image = read_image(input_path)
    result = segment_image(net, card, image, device=device, progress=progress, source=str(input_path))
    write_image(result.label, output_path, overwrite=overwrite)
    return result


def iterate_tiles(image: torch.Tensor, label: torch.Tensor | None, patch_size):
    """Non-overlapping patch-sized tiles covering a model-space volume, for passes that must see every
    voxel exactly once (prototype and confidence statistics over a dataset).

    Args:
        image: ``(1, X, Y, Z)``; label: ``(1, X, Y, Z)`` or None.
    Yields ``(image_tile (1, 1, *patch), label_tile (1, *patch) or None, valid (1, *patch))``; the volume is
    zero-padded up to a multiple of the patch and ``valid`` marks the real voxels.
    """
    image = torch.as_tensor(image)
    shape = image.shape[1:]
    padded = [int(np.ceil(n / p)) * p for n, p in zip(shape, patch_size)]
    pad = [(0, p - n) for n, p in zip(shape, padded)]
    flat_pad = [x for pair in reversed(pad) for x in pair]  # F.pad wants the last axis first
    image = torch.nn.functional.pad(image.float(), flat_pad)
    valid = torch.nn.functional.pad(torch.ones(1, *shape, dtype=torch.bool), flat_pad)
    label = None if label is None else torch.nn.functional.pad(torch.as_tensor(label).float(), flat_pad)
    for x in range(0, padded[0], patch_size[0]):
        for y in range(0, padded[1], patch_size[1]):
            for z in range(0, padded[2], patch_size[2]):
                box = (slice(None), slice(x, x + patch_size[0]), slice(y, y + patch_size[1]), slice(z, z + patch_size[2]))
                yield (image[box][None], None if label is None else label[box].long(), valid[box])
