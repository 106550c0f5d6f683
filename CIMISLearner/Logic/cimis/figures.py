"""Pictures people would rather look at than read: CT slices with label maps overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cimis.data.classes import ClassSet


def _rgba_overlay(label: np.ndarray, classes: ClassSet, alpha: float) -> np.ndarray:
    colors = np.zeros((max(classes.values, default=0) + 1, 4))
    for c in classes:
        colors[c.value, :3] = np.array(c.color) / 255.0
        colors[c.value, 3] = alpha
    return colors[label]


def overlay_png(
    image: sitk.Image,
    labels: dict[str, sitk.Image],
    classes: ClassSet,
    path: str | Path,
    window: tuple[float, float] = (-175.0, 250.0),
    title: str = "",
) -> Path:
    """Write a PNG: one row per label map (e.g. reference, prediction), an axial and a coronal slice each,
    through the centre of the labelled region, with a legend of the classes present.

    The CT is resampled to isotropic display pixels using its spacing, so organs keep their proportions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))  # (z, y, x): axial slices, left on the right
    oriented = {k: sitk.GetArrayFromImage(sitk.DICOMOrient(v, "LPS")).astype(np.int64) for k, v in labels.items()}
    sx, sy, sz = sitk.DICOMOrient(image, "LPS").GetSpacing()
    union = np.zeros(ct.shape, dtype=bool)
    for lab in oriented.values():
        union |= lab > 0
    zc, yc, _ = (np.argwhere(union).mean(0).astype(int) if union.any() else np.array(ct.shape) // 2)

    fig, axes = plt.subplots(len(oriented), 2, figsize=(9, 4.2 * len(oriented)), squeeze=False)
    present = set()
    for row, (name, lab) in enumerate(oriented.items()):
        present |= set(np.unique(lab).tolist())
        views = [
            ("axial", ct[zc], lab[zc], sy / sx),
            ("coronal", ct[::-1, yc, :], lab[::-1, yc, :], sz / sx),
        ]
        for col, (view, ct_slice, lab_slice, aspect) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(ct_slice, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
            ax.imshow(_rgba_overlay(lab_slice, classes, 0.55), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}: {view}")
            ax.axis("off")
    handles = [Patch(color=np.array(c.color) / 255.0, label=c.name) for c in classes if c.value in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5) or 1, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
