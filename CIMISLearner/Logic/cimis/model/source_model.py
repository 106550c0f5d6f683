"""A model read from another tool (a MONAI bundle, an nnU-Net v2 folder), before it becomes a model folder.

Each reader (``cimis.model.monai_bundle``, ``cimis.model.nnunet_source``) turns its source into a
:class:`SourceModel` without executing anything from the source's files; ``cimis import-model`` then
builds the network from ``builder`` and ``args``, loads ``state_dict``, turns the final 1x1x1 convolution
into the growable head and writes an ordinary CIMISLearner model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SourceModel:
    """What a reader found in a source model.

    Attributes:
        kind: ``"monai-bundle"`` or ``"nnunet"``.
        builder: the key of the network's constructor in the table of supported networks, e.g.
            ``"monai.SegResNet"`` or ``"nnunet.PlainConvUNet"``; stored in the card.
        args: the constructor's keyword arguments, plain JSON values only (stored in the card, bounded
            by :mod:`cimis.model.card_limits` when read back).
        state_dict: the source's weights as loaded (never unpickled beyond plain tensors and containers).
        final_conv: dotted attribute path, in the built network, of the 1x1x1 convolution that maps the
            features F to the class logits; it becomes the growable head.
        class_names: one name per output channel after the background channel 0.
        label_values: the label value of each of those channels in the source's label maps.
        spacing: target voxel spacing in mm, in the order of :class:`~cimis.data.preprocess.PreprocessConfig`.
        patch_size: the source's training / sliding-window patch size in voxels.
        orientation: the axis code the source expects (``"RAS"``), or ``""`` where the source does not
            reorient.
        normalization: how CT intensities become network input, one of
            ``{"kind": "window", "window": [lo, hi], "range": [b_min, b_max]}`` (clip to the window, map
            linearly to the range: MONAI's ScaleIntensityRanged with ``clip=True``) or
            ``{"kind": "clip_zscore", "clip": [lo, hi], "mean": m, "std": s}`` (clip, then subtract the
            mean and divide by the standard deviation: nnU-Net's CT normalisation).
        notes: what the reader chose that the user should know (a fold picked, an option ignored).
        head: for a network without a final 1x1x1 convolution that is followed by one outside it (a
            bundle exported by CIMISLearner: ``Sequential(UNet, Conv3d(D, C, 1))``), that convolution's
            ``(weight (C, D, 1, 1, 1), bias (C,))``; None otherwise.
    """

    kind: str
    builder: str
    args: dict
    state_dict: dict[str, torch.Tensor]
    final_conv: str
    class_names: list[str]
    label_values: list[int]
    spacing: list[float]
    patch_size: list[int]
    orientation: str = "RAS"
    normalization: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    head: tuple[torch.Tensor, torch.Tensor] | None = None
