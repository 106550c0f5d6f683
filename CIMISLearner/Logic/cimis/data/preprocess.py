"""Preprocessing with MONAI transforms: from a SimpleITK volume to network input, and back.

"Model space" is the grid the network sees: RAS orientation, the model's target spacing, CT intensities
windowed and scaled to [0, 1]. Training adds a foreground crop, label-balanced patch sampling and
augmentation; inference resamples the network's class probabilities back onto the input's own grid.

SimpleITK works in LPS, MONAI's affines in RAS: :func:`sitk_to_metatensor` converts, as MONAI's ITKReader
does with ``affine_lps_to_ras=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from cimis.errors import CimisError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class PreprocessConfig:
    """How volumes are brought into model space; stored in the model card.

    Attributes:
        spacing: target voxel spacing in mm (RAS axes).
        window: CT window ``(low, high)`` in HU, mapped to [0, 1] with clipping. The default is the
            soft-tissue window of the BTCV literature.
        patch_size: training patch and sliding-window size in voxels.
        crop_foreground: crop training volumes to the body (voxels brighter than the window's low end).
        orientation: axis codes the volume is reoriented to; ``""`` keeps the file's own voxel order (an
            nnU-Net model, which never reorients).
        normalization: None (every model trained here: ``window`` mapped to [0, 1]) or an imported model's
            own intensity mapping, ``{"kind": "window", "window": [lo, hi], "range": [b0, b1]}`` (clip to the
            window, map linearly onto the range: MONAI's ScaleIntensityRanged) or
            ``{"kind": "clip_zscore", "clip": [lo, hi], "mean": m, "std": s}`` (clip, subtract the mean,
            divide by the standard deviation: nnU-Net's CT normalisation). It replaces ``window``.
    """

    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])
    window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    crop_foreground: bool = True
    orientation: str = "RAS"
    normalization: dict | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if self.normalization is None:
            del d["normalization"]  # cards of models trained here stay as they were
        return d

    def intensity_mapping(self) -> tuple[list[float], list[float]]:
        """``(HU window [a0, a1], output range [b0, b1])``: every normalisation here is a clipped linear map
        (nnU-Net's clip + z-score is one, with ``b = (a - mean) / std``)."""
        norm = self.normalization
        if norm is None:
            return list(self.window), [0.0, 1.0]
        if norm["kind"] == "window":
            return list(norm["window"]), list(norm["range"])
        lo, hi = norm["clip"]
        return [lo, hi], [(lo - norm["mean"]) / norm["std"], (hi - norm["mean"]) / norm["std"]]

    @staticmethod
    def from_json(d: dict) -> "PreprocessConfig":
        unknown = set(d) - set(PreprocessConfig.__dataclass_fields__)
        if unknown:
            raise CimisError(f"unknown preprocessing settings {sorted(unknown)} in the model card")
        return PreprocessConfig(**d)


def sitk_to_metatensor(image: sitk.Image, dtype=torch.float32) -> MetaTensor:
    """A 3D SimpleITK image as a channel-first ``(1, X, Y, Z)`` MetaTensor with its RAS affine."""
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[None, :]
    affine[:3, 3] = image.GetOrigin()
    tensor = torch.as_tensor(np.ascontiguousarray(array)).to(dtype)[None]
    return MetaTensor(tensor, affine=torch.as_tensor(_LPS_TO_RAS @ affine, dtype=torch.float64))


def metatensor_to_sitk(tensor: torch.Tensor, affine: np.ndarray | torch.Tensor | None = None) -> sitk.Image:
    """A ``(1, X, Y, Z)`` or ``(X, Y, Z)`` tensor with an RAS affine as a SimpleITK image."""
    if affine is None:
        affine = tensor.affine  # type: ignore[attr-defined]
    affine = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    array = np.asarray(tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor)
    if array.ndim == 4:
        array = array[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing[None, :]).flatten().tolist())
    return image


def model_space_transforms(config: PreprocessConfig, with_label: bool) -> Compose:
    """Deterministic: reorient, resample to the target spacing, window and scale the CT intensities."""
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    (low, high), (b_min, b_max) = config.intensity_mapping()
    steps = []
    if config.orientation:  # "" keeps the file's voxel order (nnU-Net)
        steps.append(Orientationd(keys, axcodes=config.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    return Compose(steps + [
        Spacingd(keys, pixdim=config.spacing, mode=modes, dtype=np.float32),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=True),
    ])


def training_transforms(config: PreprocessConfig, num_channels: int) -> Compose:
    """Deterministic, cacheable part of training: model space, body crop, pad to patch, class indices."""
    steps = [model_space_transforms(config, with_label=True)]
    if config.crop_foreground:
        # After windowing, anything darker than the window's low end (air, lung) is exactly its image b0.
        floor = config.intensity_mapping()[1][0]
        steps.append(CropForegroundd(["image", "label"], source_key="image", select_fn=lambda x: x != floor, margin=2))
    steps += [
        SpatialPadd(["image", "label"], spatial_size=config.patch_size),
        # Voxel indices per class, computed once, so balanced sampling is cheap every iteration.
        ClassesToIndicesd("label", num_classes=num_channels),
    ]
    return Compose(steps)


def patch_sampling_transforms(
    config: PreprocessConfig, num_channels: int, samples_per_volume: int, augment: bool
) -> Compose:
    """Random part of training: label-balanced patches (every class, background included, equally likely
    as a patch centre, so small organs are seen as often as the liver), then augmentation.

    No left-right flips: they would swap left and right organs.
    """
    steps = [
        RandCropByLabelClassesd(
            ["image", "label"], label_key="label", spatial_size=config.patch_size, num_classes=num_channels,
            num_samples=samples_per_volume, indices_key="label_cls_indices", warn=False,
        )
    ]
    if augment:
        steps += [
            RandAffined(
                ["image", "label"], prob=0.2, rotate_range=(0.15, 0.15, 0.15), scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"), padding_mode="border",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.3),
            RandShiftIntensityd("image", offsets=0.05, prob=0.3),
            RandGaussianNoised("image", std=0.02, prob=0.2),
        ]
    return Compose(steps)
