"""Seeded synthetic abdominal CT volumes ("phantoms") with organ label maps.

The phantoms let the whole pipeline (training, class-incremental steps, evaluation, the demo) run without
downloading BTCV or WORD. They are not meant to fool a radiologist, only to be learnable the way real CT
is: by intensity *and* position *and* shape. Liver, spleen and pancreas overlap in Hounsfield units,
left and right kidney differ only by side, unlabelled bowel and vessels act as distractors.

Coordinate convention
---------------------
Everything is built in physical millimetres in the LPS frame SimpleITK uses, with an identity direction:

* ``x`` (voxel index ``i``) increases toward the patient's LEFT,
* ``y`` (index ``j``) increases toward POSTERIOR,
* ``z`` (index ``k``) increases toward SUPERIOR.

So the *right* kidney has negative ``x`` and low ``i``. numpy arrays are ``[k, j, i]`` = ``[z, y, x]``,
as returned by ``sitk.GetArrayFromImage``.

The organ tables below use an *anatomy frame*: the same axes, origin at the centre of the body
cross-section, ``z = 0`` near the renal hila (L1/L2). Each case draws a small global scale and shift;
the voxel centres are mapped into the anatomy frame with ``(p - shift) / scale`` and every shape is
evaluated there, so the tables never change.

Design
------
1. ``_sample_anatomy`` draws every random number of a case from ``numpy.random.default_rng(seed)`` in a
   fixed order, independent of spacing and variant: body size, organ positions/sizes/rotations,
   intensities, bowel loops. Shapes are continuous (ellipsoids, tubes along splines, sums of random
   cosines as smooth fields), so a seed gives the same anatomy at any spacing.
2. ``_render`` rasterises the shapes on the voxel grid, painting in a fixed order where later
   structures win: body layers, lungs/heart, bowel, solid organs, vessels, then muscles and bones. Each
   shape is evaluated only inside its bounding box.
3. A slight Gaussian blur (partial-volume edges) and Gaussian noise finish the image.

The two variants share the anatomy; they differ in field of view (``btcv``: liver dome to the iliac
crest, ``word``: down to the femoral heads) and in which structures carry a label.

Scanners
--------
A :class:`Scanner` says how a case is acquired: intensity calibration (scale and offset), noise and blur,
voxel spacing and field of view, the contrast phase, and how much the organs' shapes vary beyond the
usual. :data:`REFERENCE_SCANNER` is the one every phantom used before scanners existed (its output is
unchanged, bit for bit). :data:`OTHER_SCANNER` is "another hospital's scanner": the hard setting of the
benchmark, in which the step's volumes come from it while the base model saw only the reference scanner,
so the old model is right in some regions and wrong in others. The scanner's own random draws (shape
variation) come from a generator seeded separately, so a case's anatomy is the same under both scanners
apart from the documented changes.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from cimis.data.classes import ClassSet, btcv_classes, word_classes
from cimis.data.io import check_folder_output
from cimis.errors import CimisError

Vec3 = tuple[float, float, float]

VARIANTS = ("btcv", "word")
MANIFEST_FORMAT = "cimis-manifest/1"

# Field of view (mm) along x, y, z. The top of the volume is Z_TOP in the anatomy frame (just above the
# liver dome); the bottom follows from the z extent.
_FOV_XY = (384.0, 320.0)
_FOV_Z = {"btcv": 240.0, "word": 420.0}
_Z_TOP = 125.0

# Voxel spacing accepted, in mm: below 0.5 mm a volume would take gigabytes.
_SPACING_RANGE = (0.5, 20.0)


@dataclass(frozen=True)
class Scanner:
    """How a phantom is acquired (module docstring, "Scanners").

    Attributes:
        name: how manifests and reports call it.
        intensity_scale, intensity_offset: the stored value is ``scale * HU + offset`` (a scanner whose
            calibration differs; CT numbers of the same tissue differ between vendors and kernels).
        noise_factor, blur_factor: times the case's own noise level and partial-volume blur.
        spacing_factor: times the requested voxel spacing, per axis (x, y, z): thicker slices, other pixels.
        fov_factor: times the field of view per axis; fov_shift_z moves its top (mm, negative = lower, so
            the liver dome and spleen tip may leave the volume).
        phase: ``portal-venous`` (the reference) or ``arterial``: arteries and renal cortex brighter,
            portal and hepatic veins, IVC and liver darker (:data:`PHASE_HU`).
        shape_variation: standard deviation of a log-normal size factor per organ and axis (0: none).
    """

    name: str = "reference"
    intensity_scale: float = 1.0
    intensity_offset: float = 0.0
    noise_factor: float = 1.0
    blur_factor: float = 1.0
    spacing_factor: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fov_factor: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fov_shift_z: float = 0.0
    phase: str = "portal-venous"
    shape_variation: float = 0.0

    def __post_init__(self):
        if self.phase not in PHASE_HU:
            raise CimisError(f"unknown contrast phase {self.phase!r}", f"use one of {', '.join(PHASE_HU)}")
        numbers = (self.intensity_scale, self.noise_factor, self.blur_factor, *self.spacing_factor, *self.fov_factor)
        if not all(math.isfinite(v) and v > 0 for v in numbers) or not self.shape_variation >= 0:
            raise CimisError(f"scanner {self.name!r}: scales and factors must be positive numbers")

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# HU change per tissue in each contrast phase, relative to the portal-venous tables below. Arterial phase
# (about 35 s after injection): the aorta and its branches peak, the renal cortex enhances before the
# medulla, the portal system, hepatic veins and IVC are not yet filled and the liver is barely enhanced.
PHASE_HU: dict[str, dict[str, float]] = {
    "portal-venous": {},
    "arterial": {"aorta": 150.0, "kidney_cortex": 70.0, "kidney_medulla": -40.0, "pancreas": 25.0,
                 "spleen": 15.0, "heart": 60.0, "liver": -40.0, "portal": -85.0, "vein": -75.0, "ivc": -70.0},
}

REFERENCE_SCANNER = Scanner()
OTHER_SCANNER = Scanner(
    name="other", intensity_scale=0.92, intensity_offset=30.0, noise_factor=1.6, blur_factor=1.8,
    spacing_factor=(0.85, 0.85, 1.5), fov_factor=(0.85, 0.9, 0.85), fov_shift_z=-15.0, phase="arterial",
    shape_variation=0.12,
)
SCANNERS = {"reference": REFERENCE_SCANNER, "other": OTHER_SCANNER}
# write_phantom_dataset(..., step_scanner=...): the split holding the cases of the steps' scanner.
STEP_SPLIT = "train_steps"


# --------------------------------------------------------------------------------------------------
# Organ tables (anatomy frame, mm; HU for the portal-venous phase)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlobSpec:
    """An organ modelled as a rotated ellipsoid with a bumpy surface.

    ``semi`` are the semi-axes along the organ's own axes; ``rot`` rotates those axes by the given
    degrees about x, then y, then z. ``bump`` is the surface perturbation as a fraction of the radius.
    """

    centre: Vec3
    semi: Vec3
    rot: Vec3 = (0.0, 0.0, 0.0)
    bump: float = 0.07


@dataclass(frozen=True)
class TubeSpec:
    """A tubular structure: a smooth spline through ``path`` with a radius per control point.

    ``aniso`` stretches the cross-section along the anatomy axes (0.8 in y = flattened front to back).
    """

    path: tuple[Vec3, ...]
    radius: tuple[float, ...]
    aniso: Vec3 = (1.0, 1.0, 1.0)
    bump: float = 0.05


BLOBS: dict[str, BlobSpec] = {
    # The liver is two overlapping ellipsoids (big right lobe, flat left lobe reaching across the
    # midline in front of the stomach), clipped by the body wall and the diaphragm dome.
    "liver_right": BlobSpec((-62, 6, 52), (68, 84, 66), (0, 0, -10), 0.05),
    "liver_left": BlobSpec((2, -50, 64), (60, 30, 34), (0, 12, -15), 0.06),
    "gallbladder": BlobSpec((-56, -52, 16), (15, 17, 32), (30, 0, -20), 0.05),
    # The spleen hugs the left posterolateral wall; its long in-plane axis follows the ribs.
    "spleen": BlobSpec((86, 42, 50), (27, 52, 44), (0, 0, 40), 0.07),
    # Kidneys: upper pole medial (rotation about y) and posterior (about x), hilum turned forward
    # (about z). The left kidney sits ~10 mm higher than the right (the liver pushes the right down).
    "kidney_r": BlobSpec((-74, 48, -40), (29, 25, 57), (-10, 10, -30), 0.04),
    "kidney_l": BlobSpec((74, 48, -30), (29, 25, 57), (-10, -10, 30), 0.04),
    # Adrenals: thin plates above/medial to the upper poles. 6.5 mm semi-axis = 13 mm thick, enough
    # for three voxels at 4 mm.
    "adrenal_r": BlobSpec((-40, 38, 30), (6.5, 16, 14), (0, 0, -35), 0.08),
    "adrenal_l": BlobSpec((42, 34, 26), (6.5, 16, 14), (0, 0, 35), 0.08),
    "bladder": BlobSpec((0, -35, -238), (42, 32, 32), (0, 0, 0), 0.05),
    "femoral_head_r": BlobSpec((-88, 8, -268), (23, 23, 23), (0, 0, 0), 0.0),
    "femoral_head_l": BlobSpec((88, 8, -268), (23, 23, 23), (0, 0, 0), 0.0),
    # Only drawn above the diaphragm; its lower surface shows in the top slices.
    "heart": BlobSpec((20, -40, 150), (80, 65, 70), (0, 0, 0), 0.03),
}

TUBES: dict[str, TubeSpec] = {
    # Upper GI tract, from the top of the field of view down.
    "esophagus": TubeSpec(((4, 8, 150), (8, 3, 120), (20, -4, 100), (38, 4, 88)), (9, 9.5, 10, 10)),
    "stomach": TubeSpec(
        ((48, 18, 92), (66, 0, 68), (58, -38, 44), (25, -62, 22), (-8, -55, 12)), (32, 34, 30, 21, 12)
    ),
    # The C-loop of the duodenum wraps the pancreatic head; its third part crosses in front of the aorta.
    "duodenum": TubeSpec(
        ((-8, -55, 12), (-32, -42, 8), (-55, -22, -5), (-60, -12, -35), (-48, -8, -62),
         (-15, -10, -76), (15, -10, -72), (30, -16, -55), (36, -24, -30)),
        (12, 13, 12, 11, 11, 11, 11, 11, 10),
    ),
    # Frame of the colon: caecum right lower, up, across the front, down the left, sigmoid, then rectum.
    "colon": TubeSpec(
        ((-70, -30, -170), (-86, -15, -120), (-96, -10, -60), (-95, -20, -15), (-78, -52, 2),
         (-35, -70, -22), (5, -72, -42), (45, -68, -22), (85, -40, 8), (104, -8, 12), (108, 2, -30),
         (106, 2, -100), (95, -6, -150), (60, -25, -185), (20, -20, -205), (0, 28, -218)),
        (27, 25, 24, 22, 22, 21, 21, 20, 19, 18, 17, 17, 16, 15, 15, 15),
    ),
    "rectum": TubeSpec(((0, 28, -218), (0, 55, -242), (0, 58, -266), (0, 45, -300)), (15, 18, 17, 11)),
    # Great vessels. The aorta runs left-anterior of the spine and divides at about L4.
    "aorta": TubeSpec(
        ((14, 30, 150), (16, 27, 80), (14, 20, 20), (10, 14, -60), (6, 12, -118)), (11, 11, 10.5, 10, 9.5)
    ),
    "ivc": TubeSpec(
        ((-16, 0, 150), (-20, 8, 95), (-22, 18, 30), (-22, 21, -40), (-18, 19, -120)),
        (13, 13, 12, 11, 11), aniso=(1.0, 0.75, 1.0),
    ),
    # Portal system, all starting at the confluence behind the pancreatic neck.
    "portal_vein": TubeSpec(((4, -10, -8), (-12, -8, 8), (-30, -2, 25), (-48, 2, 34)), (8, 8, 7, 5.5)),
    "portal_left": TubeSpec(((-30, -2, 25), (-22, -14, 32), (-12, -28, 40)), (5, 4.5, 4)),
    "splenic_vein": TubeSpec(
        ((4, -10, -8), (25, 4, 0), (50, 15, 10), (72, 25, 20), (85, 32, 32)), (6, 6, 6, 5.5, 5)
    ),
    "smv": TubeSpec(((4, -10, -8), (2, -22, -30), (-2, -32, -70), (-6, -40, -115)), (6, 5.5, 5, 4.5)),
    "sma": TubeSpec(((12, 12, -2), (14, -10, -20), (12, -28, -60), (8, -40, -110)), (4, 4, 3.5, 3.5)),
    # The pancreas is a flattened tube: head in the duodenal C-loop, tail at the splenic hilum.
    "pancreas": TubeSpec(
        ((-38, -12, -30), (-30, -18, -12), (-5, -26, -4), (25, -12, 6), (55, 2, 14), (80, 14, 26)),
        (18, 16, 13, 13, 12, 8.5), aniso=(1.0, 0.8, 1.0), bump=0.08,
    ),
    # Hepatic veins converge on the IVC under the dome (drawn inside the liver only).
    "hepatic_vein_r": TubeSpec(((-100, 25, 55), (-60, 15, 85), (-20, 4, 105)), (3.5, 5, 6)),
    "hepatic_vein_m": TubeSpec(((-45, -50, 45), (-30, -20, 80), (-18, 0, 105)), (3.5, 4.5, 5.5)),
    "hepatic_vein_l": TubeSpec(((25, -50, 70), (0, -25, 90), (-15, -2, 106)), (3, 4, 5)),
    # Muscles (one side; mirrored for the other).
    "psoas": TubeSpec(
        ((28, 45, 20), (38, 45, -40), (48, 40, -110), (60, 25, -170), (72, 5, -230), (80, -5, -268)),
        (6, 12, 18, 20, 18, 14),
    ),
    "paraspinal": TubeSpec(((36, 88, 150), (38, 86, -100), (32, 100, -180), (25, 108, -240)),
                           (24, 26, 20, 14), aniso=(1.0, 0.7, 1.0)),
    # Pelvic vessels and bones (one side; mirrored).
    "iliac_artery": TubeSpec(((6, 12, -118), (40, 15, -170), (60, 10, -215), (75, -15, -265)), (7, 6.5, 6, 6)),
    "iliac_vein": TubeSpec(((-18, 19, -120), (35, 25, -170), (55, 20, -215), (70, -5, -265)), (8, 8, 7.5, 7)),
    "iliac_wing": TubeSpec(((40, 75, -150), (80, 55, -165), (110, 20, -170)), (9, 10, 9),
                           aniso=(1.0, 1.0, 3.0)),
    "acetabular_roof": TubeSpec(((60, 55, -190), (85, 30, -220), (92, 12, -244)), (12, 14, 13)),
    "pubic_ramus": TubeSpec(((80, -5, -262), (45, -40, -278), (12, -60, -282)), (8, 7, 7)),
    "femoral_neck": TubeSpec(((88, 8, -268), (118, 0, -300)), (14, 16)),
}

# Nominal intensities (HU). ENHANCING tissues scale with the per-case contrast factor around 40 HU.
HU: dict[str, float] = {
    "air": -1000, "lung": -850, "subcut_fat": -100, "visceral_fat": -75, "muscle": 50, "heart": 125,
    "liver": 105, "spleen": 115, "kidney_cortex": 160, "kidney_medulla": 105, "kidney_pelvis": 15,
    "gallbladder": 10, "esophagus": 45, "stomach_wall": 90, "fluid": 12, "aorta": 180, "ivc": 140,
    "portal": 175, "vein": 150, "pancreas": 95, "adrenal": 55, "bowel_wall": 45, "stool": -80,
    "bladder": 10, "bone_cortex": 650, "bone_marrow": 230, "disc": 90, "csf": 15,
}
ENHANCING = {
    "muscle", "heart", "liver", "spleen", "kidney_cortex", "kidney_medulla", "esophagus", "stomach_wall",
    "aorta", "ivc", "portal", "vein", "pancreas", "adrenal", "bowel_wall",
}

# Which structure carries which class in each variant; anything not listed is painted with label 0.
LABELS: dict[str, dict[str, str]] = {
    "btcv": {
        "spleen": "spleen", "kidney_r": "right kidney", "kidney_l": "left kidney",
        "gallbladder": "gallbladder", "esophagus": "esophagus", "liver": "liver", "stomach": "stomach",
        "aorta": "aorta", "ivc": "inferior vena cava", "portal": "portal vein and splenic vein",
        "pancreas": "pancreas", "adrenal_r": "right adrenal gland", "adrenal_l": "left adrenal gland",
    },
    "word": {
        "liver": "liver", "spleen": "spleen", "kidney_l": "left kidney", "kidney_r": "right kidney",
        "stomach": "stomach", "gallbladder": "gallbladder", "esophagus": "esophagus", "pancreas": "pancreas",
        "duodenum": "duodenum", "colon": "colon", "small_bowel": "intestine", "adrenal_r": "adrenal",
        "adrenal_l": "adrenal", "rectum": "rectum", "bladder": "bladder",
        "femoral_head_l": "head of left femur", "femoral_head_r": "head of right femur",
    },
}


def variant_classes(variant: str) -> ClassSet:
    """The class set a variant's label maps use."""
    _check_variant(variant)
    return btcv_classes() if variant == "btcv" else word_classes()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

@dataclass
class Phantom:
    """One synthetic case: an int16 CT image (HU), its uint8 label map on the same grid, and the classes."""

    image: sitk.Image
    label: sitk.Image
    classes: ClassSet


def generate_phantom(seed: int, variant: str = "btcv",
                     spacing: Union[float, Sequence[float]] = (3.0, 3.0, 3.0),
                     scanner: Scanner = REFERENCE_SCANNER) -> Phantom:
    """A synthetic abdominal CT volume and its labels; the same seed gives bit-identical output.

    Args:
        seed: non-negative integer seeding ``numpy.random.default_rng``.
        variant: ``"btcv"`` (13 BTCV organs, liver dome to iliac crest) or ``"word"`` (16 WORD organs,
            liver dome to femoral heads).
        spacing: voxel size in mm along x, y, z (a single number means isotropic); the scanner's spacing
            factor multiplies it.
        scanner: how the case is acquired (:class:`Scanner`).
    """
    _check_variant(variant)
    sp = _check_spacing(tuple(s * f for s, f in zip(_check_spacing(spacing), scanner.spacing_factor)))
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    anatomy = _sample_anatomy(rng)
    if scanner != REFERENCE_SCANNER:
        _apply_scanner(anatomy, scanner, np.random.default_rng([seed, 7919]))
    canvas = _Canvas(variant, sp, anatomy.scale, anatomy.shift, scanner.fov_factor, scanner.fov_shift_z)
    _render(canvas, anatomy)
    image = _finish_image(canvas, anatomy, rng, scanner)
    label = sitk.GetImageFromArray(canvas.label)
    label.CopyInformation(image)
    return Phantom(image=image, label=label, classes=canvas.classes)


def write_phantom_dataset(out_dir: Union[str, pathlib.Path], num_cases: int, variant: str = "btcv",
                          spacing: Union[float, Sequence[float]] = (3.0, 3.0, 3.0), seed: int = 0,
                          val_cases: int = 1, test_cases: int = 1, progress: bool = True,
                          step_scanner: Optional[Scanner] = None) -> pathlib.Path:
    """Write ``num_cases`` phantoms and a ``cimis-manifest/1`` manifest; returns the manifest path.

    Layout: ``imagesTr/phantom_XXX.nii.gz``, ``labelsTr/phantom_XXX.nii.gz``, ``manifest.json``. The last
    ``test_cases`` cases form the test split, the ``val_cases`` before them the validation split. Case
    ``i`` uses seed ``seed * 100003 + i``. An existing non-empty folder is only reused when it holds a
    previous phantom dataset; then its old phantom files are replaced.

    With ``step_scanner`` (the hard setting) the training cases are shared between two scanners: the first
    half, split ``train``, from the reference scanner (step 0 learns from them), the second half, split
    ``train_steps``, from ``step_scanner`` (the incremental steps learn from them). Validation and test
    cases alternate reference, step scanner, ...; the splits ``scanner_reference`` and ``scanner_STEP``
    name every case of each scanner, and the manifest's name ends in ``-hard``.
    """
    _check_variant(variant)
    sp = _check_spacing(spacing)
    seed = _check_seed(seed)
    for name, value in (("num_cases", num_cases), ("val_cases", val_cases), ("test_cases", test_cases)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CimisError(f"{name} must be a non-negative integer, got {value!r}")
    if num_cases < val_cases + test_cases + 1:
        raise CimisError(
            f"num_cases={num_cases} leaves no training case after {val_cases} validation and {test_cases} test cases",
            f"use num_cases >= {val_cases + test_cases + 1}",
        )
    out = pathlib.Path(out_dir)
    _prepare_out_dir(out)

    from tqdm.auto import tqdm  # imported here so that importing this module stays light

    classes = variant_classes(variant)
    ids = [f"phantom_{i:03d}" for i in range(num_cases)]
    n_train = num_cases - val_cases - test_cases
    if step_scanner is not None and n_train < 2:
        raise CimisError(f"the hard setting needs at least 2 training cases (one per scanner), got {n_train}",
                         f"use num_cases >= {val_cases + test_cases + 2}")
    scanners = [REFERENCE_SCANNER] * num_cases
    if step_scanner is not None:
        half = (n_train + 1) // 2
        held_out = range(n_train, num_cases)
        scanners = ([REFERENCE_SCANNER] * half + [step_scanner] * (n_train - half)
                    + [REFERENCE_SCANNER if (i - n_train) % 2 == 0 else step_scanner for i in held_out])
    cases = []
    for i in tqdm(range(num_cases), desc=f"phantoms ({variant})", unit="case", disable=not progress):
        ph = generate_phantom(seed * 100003 + i, variant, sp, scanners[i])
        image_rel, label_rel = f"imagesTr/{ids[i]}.nii.gz", f"labelsTr/{ids[i]}.nii.gz"
        sitk.WriteImage(ph.image, str(out / image_rel), True)
        sitk.WriteImage(ph.label, str(out / label_rel), True)
        cases.append({"id": ids[i], "image": image_rel, "label": label_rel})
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + val_cases], "test": ids[n_train + val_cases:]}
    if step_scanner is not None:
        splits["train"] = [i for i, sc in zip(ids[:n_train], scanners) if sc == REFERENCE_SCANNER]
        splits[STEP_SPLIT] = [i for i, sc in zip(ids[:n_train], scanners) if sc == step_scanner]
        splits["scanner_reference"] = [i for i, sc in zip(ids, scanners) if sc == REFERENCE_SCANNER]
        splits[f"scanner_{step_scanner.name}"] = [i for i, sc in zip(ids, scanners) if sc == step_scanner]
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": f"phantom-{variant}" + ("-hard" if step_scanner is not None else ""),
        "classes": classes.to_json(),
        "cases": cases,
        "splits": splits,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------

def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise CimisError(f"unknown phantom variant {variant!r}", f"use one of {', '.join(VARIANTS)}")


def _check_spacing(spacing: Union[float, Sequence[float]]) -> tuple[float, float, float]:
    try:
        values = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CimisError(f"spacing must be three numbers in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise CimisError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    lo, hi = _SPACING_RANGE
    if not all(lo <= v <= hi for v in values):
        raise CimisError(f"spacing {values} mm is outside the supported range {lo}-{hi} mm")
    return values[0], values[1], values[2]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CimisError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


_PHANTOM_FILE = re.compile(r"phantom_\d+\.nii\.gz")


def _prepare_out_dir(out: pathlib.Path) -> None:
    """Create ``out``, or clear the phantom files of a previous run; refuse any other non-empty folder."""
    check_folder_output(out, "phantom dataset")
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            previous = json.loads(manifest.read_text())
            ours = previous.get("format") == MANIFEST_FORMAT and str(previous.get("name", "")).startswith("phantom-")
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise CimisError(
                f"{out} is not empty and does not hold a phantom dataset; refusing to overwrite it",
                "choose an empty or new folder",
            )
        # Only our own files go; anything the user added stays.
        for sub in ("imagesTr", "labelsTr"):
            folder = out / sub
            if folder.is_dir():
                for f in folder.iterdir():
                    if f.is_file() and _PHANTOM_FILE.fullmatch(f.name):
                        f.unlink()
        manifest.unlink()
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Geometry primitives
# --------------------------------------------------------------------------------------------------

class _Field:
    """A smooth random field with zero mean and unit variance: a sum of random plane cosines.

    Cheap to evaluate anywhere, infinitely smooth, and independent of the voxel grid, unlike upsampled
    noise. ``wavelength`` (mm) sets the size of the features.
    """

    def __init__(self, rng: np.random.Generator, wavelength: tuple[float, float], waves: int = 6):
        direction = rng.normal(size=(waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lengths = rng.uniform(wavelength[0], wavelength[1], size=(waves, 1))
        self.omega = (2 * np.pi / lengths) * direction
        self.phase = rng.uniform(0, 2 * np.pi, size=waves)
        self.norm = math.sqrt(2.0 / waves)

    def __call__(self, box: "_Box") -> np.ndarray:
        out = np.zeros(box.shape, dtype=np.float32)
        for (wx, wy, wz), ph in zip(self.omega.tolist(), self.phase.tolist()):
            # Separable arguments keep the temporaries one-dimensional until the final sum.
            out += np.cos((wz * box.Z + ph) + (wy * box.Y) + (wx * box.X))
        out *= self.norm
        return np.clip(out, -2.5, 2.5)


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx; its columns are the organ's axes in the anatomy frame."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Ellipsoid:
    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    bump: float
    field: _Field

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        # Half extent of a rotated ellipsoid along each anatomy axis, widened for the surface bumps.
        half = np.sqrt(((self.rot * self.semi) ** 2).sum(axis=1)) * (1 + 2.5 * self.bump) + 1.0
        return self.centre - half, self.centre + half

    def rho(self, box: "_Box") -> np.ndarray:
        """Normalised radius: < 1 inside the smooth ellipsoid, 1 on its surface."""
        cx, cy, cz = self.centre.tolist()
        d = (box.X - cx, box.Y - cy, box.Z - cz)
        q = np.zeros(box.shape, dtype=np.float32)
        for k in range(3):
            r0, r1, r2 = self.rot[:, k].tolist()
            q += ((r0 * d[0] + r1 * d[1] + r2 * d[2]) / float(self.semi[k])) ** 2
        return np.sqrt(q)

    def mask(self, box: "_Box", rho: Optional[np.ndarray] = None, level: float = 1.0) -> np.ndarray:
        """Inside the bumpy surface scaled by ``level`` (0.7 = an inner core of the organ)."""
        rho = self.rho(box) if rho is None else rho
        if self.bump == 0:
            return rho < level
        return rho < level * (1 + self.bump * self.field(box))


def _spline(ctrl: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense samples (about ``step`` mm apart) of a Catmull-Rom spline through ``ctrl``, with radii."""
    padded = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    points, rs = [], []
    for i in range(len(ctrl) - 1):
        p0, p1, p2, p3 = padded[i:i + 4]
        n = max(2, int(math.ceil(np.linalg.norm(p2 - p1) / step)))
        t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
        points.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                             + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
        rs.append(radii[i] + (radii[i + 1] - radii[i]) * t[:, 0])
    points.append(ctrl[-1:])
    rs.append(radii[-1:])
    return np.vstack(points), np.concatenate(rs)


@dataclass
class _Tube:
    points: np.ndarray   # (N, 3) dense centreline samples
    radii: np.ndarray    # (N,)
    aniso: np.ndarray    # (3,) cross-section stretch per anatomy axis
    bump: float
    field: Optional[_Field]

    @staticmethod
    def through(ctrl: Sequence[Sequence[float]], radii: Sequence[float], aniso: Sequence[float] = (1, 1, 1),
                bump: float = 0.0, field: Optional[_Field] = None) -> "_Tube":
        ctrl_a, radii_a = np.asarray(ctrl, dtype=float), np.asarray(radii, dtype=float)
        # Samples closer than ~40% of the radius make the union of balls look like a smooth tube.
        step = float(np.clip(0.4 * radii_a.min(), 1.0, 4.0))
        points, r = _spline(ctrl_a, radii_a, step)
        return _Tube(points, r, np.asarray(aniso, dtype=float), bump, field)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = self.radii.max() * self.aniso + 1.0
        return self.points.min(axis=0) - half, self.points.max(axis=0) + half

    def rho(self, box: "_Box") -> tuple[np.ndarray, np.ndarray]:
        """Normalised distance to the tube (< 1 inside) and the index of the nearest centreline sample."""
        best = np.full(box.shape, np.inf, dtype=np.float32)
        nearest = np.zeros(box.shape, dtype=np.int32)
        x, y, z = box.X.ravel(), box.Y.ravel(), box.Z.ravel()
        for s, (p, r) in enumerate(zip(self.points, self.radii)):
            reach = r * self.aniso
            xs = slice(np.searchsorted(x, p[0] - reach[0]), np.searchsorted(x, p[0] + reach[0], "right"))
            ys = slice(np.searchsorted(y, p[1] - reach[1]), np.searchsorted(y, p[1] + reach[1], "right"))
            zs = slice(np.searchsorted(z, p[2] - reach[2]), np.searchsorted(z, p[2] + reach[2], "right"))
            if xs.start >= xs.stop or ys.start >= ys.stop or zs.start >= zs.stop:
                continue
            d2 = (((z[zs] - p[2]) / reach[2]) ** 2)[:, None, None] \
                + (((y[ys] - p[1]) / reach[1]) ** 2)[None, :, None] \
                + (((x[xs] - p[0]) / reach[0]) ** 2)[None, None, :]
            sub, near = best[zs, ys, xs], nearest[zs, ys, xs]
            closer = d2 < sub
            sub[closer] = d2[closer]
            near[closer] = s
        np.sqrt(best, out=best)
        return best, nearest

    def mask(self, box: "_Box", rho: np.ndarray, shrink_mm: Union[float, np.ndarray] = 0.0,
             nearest: Optional[np.ndarray] = None) -> np.ndarray:
        """Inside the bumpy tube, optionally shrunk by ``shrink_mm`` (a wall thickness).

        Bumps only dent the surface inward: ``rho`` is exact only within one radius of the centreline.
        """
        level = 1.0 if self.field is None or self.bump == 0 else 1 + self.bump * np.minimum(self.field(box), 0)
        if np.any(shrink_mm):
            level = level - shrink_mm / self.radii[nearest]
        return rho < level


# --------------------------------------------------------------------------------------------------
# The canvas: voxel grid, image and label arrays
# --------------------------------------------------------------------------------------------------

@dataclass
class _Box:
    """An axis-aligned block of the grid: slices into the arrays and broadcastable coordinates."""

    slices: tuple[slice, slice, slice]
    X: np.ndarray  # (1, 1, nx) anatomy-frame x of voxel centres
    Y: np.ndarray  # (1, ny, 1)
    Z: np.ndarray  # (nz, 1, 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.Z.shape[0], self.Y.shape[1], self.X.shape[2])


class _Canvas:
    """The voxel grid of one case (physical LPS geometry) plus the HU and label arrays being painted."""

    def __init__(self, variant: str, spacing: tuple[float, float, float], scale: float, shift: np.ndarray,
                 fov_factor: Sequence[float] = (1.0, 1.0, 1.0), fov_shift_z: float = 0.0):
        self.variant = variant
        self.spacing = spacing
        fov = tuple(f * k for f, k in zip((_FOV_XY[0], _FOV_XY[1], _FOV_Z[variant]), fov_factor))
        self.size = tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing))
        # x and y are centred on the body; z spans [Z_TOP - fov_z, Z_TOP] around its middle.
        centre = (0.0, 0.0, _Z_TOP + fov_shift_z - fov[2] / 2)
        self.origin = tuple(c - (n - 1) * s / 2 for c, n, s in zip(centre, self.size, spacing))
        # Voxel centres mapped into the anatomy frame, where all shapes are defined.
        axes = [(o + np.arange(n) * s - sh) / scale for o, n, s, sh in zip(self.origin, self.size, spacing, shift)]
        self.x, self.y, self.z = (a.astype(np.float32) for a in axes)
        shape = (self.size[2], self.size[1], self.size[0])
        self.hu = np.full(shape, HU["air"], dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)
        self.classes = variant_classes(variant)
        self._values = {key: self.classes.by_name(name).value for key, name in LABELS[variant].items()}
        self.full = self.box((-np.inf,) * 3, (np.inf,) * 3)
        # Filled by the body step: where abdominal organs may lie / where anything but air may lie.
        self.abdomen = np.zeros(shape, dtype=bool)
        self.inside = np.zeros(shape, dtype=bool)
        self.body = np.zeros(shape, dtype=bool)
        self.dome = np.zeros(shape[1:], dtype=np.float32)  # diaphragm height (mm) per (y, x)

    def value(self, key: str) -> int:
        """Label value of a structure in this variant (0 = unlabelled distractor)."""
        return self._values.get(key, 0)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Optional[_Box]:
        """The grid block covering [lo, hi] (anatomy mm), or None when it misses the field of view."""
        sl = []
        for a, l, h in zip((self.z, self.y, self.x), lo[::-1], hi[::-1]):
            sl.append(slice(int(np.searchsorted(a, l)), int(np.searchsorted(a, h, "right"))))
        if any(s.start >= s.stop for s in sl):
            return None
        zs, ys, xs = sl
        return _Box((zs, ys, xs), self.x[xs][None, None, :], self.y[ys][None, :, None], self.z[zs][:, None, None])

    def paint(self, box: _Box, mask: np.ndarray, hu: Union[float, np.ndarray], key: Optional[str],
              where: Optional[np.ndarray] = None) -> None:
        """Set HU and label inside ``mask``; ``where`` (a full-grid mask) restricts the region."""
        if where is not None:
            mask = mask & where[box.slices]
        self.hu[box.slices][mask] = hu if np.ndim(hu) == 0 else hu[mask]
        self.label[box.slices][mask] = self.value(key) if key else 0


# --------------------------------------------------------------------------------------------------
# Per-case anatomy
# --------------------------------------------------------------------------------------------------

@dataclass
class _Body:
    cavity: tuple[float, float, float]   # semi-axes of the abdominal cavity: x, y anterior, y posterior
    wall: float                          # muscle wall thickness (mm)
    fat: float                           # subcutaneous fat thickness (mm)
    wobble_phase: float                  # phase of a slow ±3% variation of the cross-section along z
    dome_right: float                    # height of the right hemidiaphragm apex
    dome_left: float


@dataclass
class _Anatomy:
    scale: float
    shift: np.ndarray
    body: _Body
    hu: dict[str, float]
    blobs: dict[str, _Ellipsoid]
    tubes: dict[str, _Tube]
    loops: list[tuple[_Tube, float, float]]   # small bowel: tube, fluid fraction, air level
    ribs: list[_Tube]
    fat_field: _Field
    texture: _Field
    noise_sd: float
    blur: float


# Which tubes move together (see _sample_anatomy) and which exist on both sides.
_TUBE_GROUPS = {
    "aorta": "great_vessels", "ivc": "great_vessels", "iliac_artery": "great_vessels",
    "iliac_vein": "great_vessels", "portal_vein": "portal", "portal_left": "portal", "splenic_vein": "portal",
    "smv": "portal", "sma": "portal", "pancreas": "portal", "hepatic_vein_r": "liver",
    "hepatic_vein_m": "liver", "hepatic_vein_l": "liver", "psoas": "skeleton", "paraspinal": "skeleton",
    "iliac_wing": "skeleton", "acetabular_roof": "skeleton", "pubic_ramus": "skeleton",
    "femoral_neck": "skeleton",
}
_BILATERAL = ("psoas", "paraspinal", "iliac_artery", "iliac_vein", "iliac_wing", "acetabular_roof",
              "pubic_ramus", "femoral_neck")


def _clipped_normal(rng: np.random.Generator, sd: float, size: Union[int, tuple] = 3) -> np.ndarray:
    return np.clip(rng.normal(0.0, sd, size), -2 * sd, 2 * sd)


def _mirror(spec: TubeSpec) -> TubeSpec:
    return TubeSpec(tuple((-x, y, z) for x, y, z in spec.path), spec.radius, spec.aniso, spec.bump)


def _sample_blob(rng: np.random.Generator, spec: BlobSpec, pos_sd: float = 4.0) -> _Ellipsoid:
    centre = np.asarray(spec.centre, float) + _clipped_normal(rng, pos_sd)
    # One overall size factor plus a little per-axis variation: volume stays within ~±25%.
    semi = np.asarray(spec.semi, float) * rng.uniform(0.94, 1.06) * rng.uniform(0.95, 1.05, 3)
    rot = _rotation(np.asarray(spec.rot, float) + _clipped_normal(rng, 5.0))
    mean_radius = float(np.mean(semi))
    field = _Field(rng, (0.6 * mean_radius, 1.6 * mean_radius))
    return _Ellipsoid(centre, semi, rot, spec.bump, field)


def _sample_tube(rng: np.random.Generator, spec: TubeSpec, offset: Optional[np.ndarray] = None,
                 point_sd: float = 2.5) -> _Tube:
    ctrl = np.asarray(spec.path, float)
    offset = _clipped_normal(rng, 4.0) if offset is None else offset
    ctrl = ctrl + offset + _clipped_normal(rng, point_sd, ctrl.shape)
    radii = np.asarray(spec.radius, float) * rng.uniform(0.93, 1.07)
    field = _Field(rng, (15.0, 45.0)) if spec.bump > 0 else None
    return _Tube.through(ctrl, radii, spec.aniso, spec.bump, field)


def _small_bowel_loops(rng: np.random.Generator) -> list[tuple[_Tube, float, float]]:
    """Random walks of bowel through the mid and lower abdomen (jejunum high left, ileum low)."""
    regions = [((0, -85, -90), (85, -15, -15))] * 3 + [((-75, -85, -210), (75, 0, -60))] * 6
    loops = []
    for lo, hi in regions:
        lo_a, hi_a = np.asarray(lo, float), np.asarray(hi, float)
        p = rng.uniform(lo_a, hi_a)
        pts = [p]
        for _ in range(6):
            p = np.clip(p + rng.normal(0, 28, 3), lo_a, hi_a)
            pts.append(p)
        radius = rng.uniform(10, 14)
        # Some loops are collapsed (fluid fraction 0), some have an air-fluid level.
        fluid = float(rng.choice([0.0, 0.6, 0.8]))
        air = float(rng.uniform(0.3, 0.7)) if rng.random() < 0.35 else 2.0
        loops.append((_Tube.through(np.array(pts), [radius] * len(pts)), fluid, air))
    return loops


def _ribs(rng: np.random.Generator, body: _Body) -> list[_Tube]:
    """Ribs 7-12 on both sides, in the middle of the muscle wall, descending toward the front."""
    ribs = []
    for k, (z_post, end_deg) in enumerate(zip((150, 128, 106, 84, 60, 38), (150, 140, 128, 112, 95, 70))):
        for side in (-1, 1):
            z0 = z_post + rng.normal(0, 3)
            theta = np.radians(np.linspace(35, end_deg, 6))  # 0 = straight back, 90 = lateral
            drop = (60 if k < 4 else 35) * (theta - theta[0]) / (theta[-1] - theta[0])
            z = z0 - drop
            wobble = _wobble(body, z)  # follow the body outline exactly as _paint_body draws it
            a = body.cavity[0] * wobble + body.wall / 2
            b = np.where(np.cos(theta) > 0, body.cavity[2], body.cavity[1]) * wobble + body.wall / 2
            path = np.stack([side * a * np.sin(theta), b * np.cos(theta), z], axis=1)
            # Start at the vertebra so that the rib reaches the spine behind the muscles' front edge.
            path = np.vstack([[side * 26, 62, z0 + 4], path])
            ribs.append(_Tube.through(path, [5.0] * len(path)))
    return ribs


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Every random draw of a case, in a fixed order (so a seed is reproducible at any spacing)."""
    scale = float(rng.uniform(0.95, 1.05))
    shift = np.concatenate([_clipped_normal(rng, 4.0, 2), _clipped_normal(rng, 5.0, 1)])
    body = _Body(
        cavity=(rng.uniform(128, 142), rng.uniform(88, 100), rng.uniform(84, 94)),
        wall=float(rng.uniform(8, 13)),
        fat=float(rng.uniform(8, 30)),
        wobble_phase=float(rng.uniform(0, 2 * np.pi)),
        dome_right=float(rng.uniform(104, 114)),
        dome_left=float(rng.uniform(94, 104)),
    )
    # Intensities: a global contrast factor scales the enhancement of perfused tissue around 40 HU,
    # then each tissue gets its own offset.
    contrast = rng.uniform(0.85, 1.15)
    hu = {}
    for name, value in HU.items():
        if name in ENHANCING:
            value = 40 + contrast * (value - 40)
        if name not in ("air", "bone_cortex"):
            value += float(np.clip(rng.normal(0, 7), -15, 15))
        hu[name] = float(value)

    blobs = {key: _sample_blob(rng, spec, pos_sd=3.0 if key.startswith("adrenal") else 4.0)
             for key, spec in BLOBS.items()}
    # The two liver lobes move together.
    blobs["liver_left"].centre += 0.7 * (blobs["liver_right"].centre - np.asarray(BLOBS["liver_right"].centre))
    # The femoral heads are rigid spheres of equal size.
    blobs["femoral_head_l"].semi = blobs["femoral_head_r"].semi = np.full(3, blobs["femoral_head_r"].semi.mean())

    # Tubes that belong together share one random offset, plus a little independent jitter per point.
    offsets = {
        "great_vessels": (_clipped_normal(rng, 3.0), 1.5),
        "portal": (_clipped_normal(rng, 4.0), 1.5),   # portal system and the pancreas lying on it
        "liver": (blobs["liver_right"].centre - np.asarray(BLOBS["liver_right"].centre), 2.0),
        "skeleton": (np.zeros(3), 1.0),               # bones and their muscles stay symmetric
    }
    tubes: dict[str, _Tube] = {}
    for key, spec in TUBES.items():
        offset, sd = offsets[_TUBE_GROUPS[key]] if key in _TUBE_GROUPS else (None, 2.5)
        tubes[key] = _sample_tube(rng, spec, offset, sd)
        if key in _BILATERAL:   # the table holds the left one; mirror it for the right
            tubes[key + "_r"] = _sample_tube(rng, _mirror(spec), offset, sd)
    # Branches start exactly where their parent ends; femoral necks start in their heads.
    for key, parent in (("iliac_artery", "aorta"), ("iliac_vein", "ivc")):
        for side in (key, key + "_r"):
            tubes[side].points[0] = tubes[parent].points[-1]
    for side, key in (("l", "femoral_neck"), ("r", "femoral_neck_r")):
        tubes[key].points += blobs[f"femoral_head_{side}"].centre - tubes[key].points[0]

    return _Anatomy(
        scale=scale, shift=shift, body=body, hu=hu, blobs=blobs, tubes=tubes,
        loops=_small_bowel_loops(rng), ribs=_ribs(rng, body),
        fat_field=_Field(rng, (20, 60)), texture=_Field(rng, (8, 20)),
        noise_sd=float(rng.uniform(8, 20)), blur=float(rng.uniform(0.35, 0.55)),
    )


# --------------------------------------------------------------------------------------------------
# Rendering, in painting order (later wins)
# --------------------------------------------------------------------------------------------------

def _render(c: _Canvas, a: _Anatomy) -> None:
    _paint_body(c, a)
    _paint_thorax(c, a)
    _paint_bowel(c, a)
    _paint_liver(c, a)
    _paint_blob(c, a, "gallbladder", a.hu["gallbladder"], c.abdomen)
    _paint_upper_gi(c, a)
    _paint_blob(c, a, "spleen", _textured(a, "spleen"), c.abdomen)
    for side in ("r", "l"):
        _paint_kidney(c, a, side)
    for side in ("r", "l"):
        _paint_blob(c, a, f"adrenal_{side}", a.hu["adrenal"], c.abdomen)
    _paint_tube(c, a, "pancreas", a.hu["pancreas"], c.abdomen, key="pancreas")
    _paint_vessels(c, a)
    _paint_pelvis_soft(c, a)
    _paint_musculoskeletal(c, a)


def _textured(a: _Anatomy, tissue: str, amplitude: float = 4.0):
    """HU for a parenchymal organ: its value plus a faint smooth texture (a callable on a box)."""
    return lambda box: a.hu[tissue] + amplitude * a.texture(box)


def _paint_blob(c: _Canvas, a: _Anatomy, name: str, hu, where: np.ndarray, key: Optional[str] = None) -> None:
    blob = a.blobs[name]
    box = c.box(*blob.bounds())
    if box is None:
        return
    mask = blob.mask(box)
    c.paint(box, mask, hu(box) if callable(hu) else hu, key or name, where)


def _paint_tube(c: _Canvas, a: _Anatomy, name: str, hu, where: Optional[np.ndarray], key: Optional[str] = None,
                tube: Optional[_Tube] = None) -> None:
    tube = tube or a.tubes[name]
    box = c.box(*tube.bounds())
    if box is None:
        return
    rho, _ = tube.rho(box)
    c.paint(box, tube.mask(box, rho), hu(box) if callable(hu) else hu, key, where)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _wobble(body: _Body, z: np.ndarray) -> np.ndarray:
    """Slow ±3% variation of the body cross-section along z."""
    return 1 + 0.03 * np.cos(2 * np.pi * z / 300.0 + body.wobble_phase)


def _paint_body(c: _Canvas, a: _Anatomy) -> None:
    """Air outside; subcutaneous fat, a muscle wall and visceral fat inside an elliptical body.

    The cross-section is two half-ellipses (anterior and posterior semi-axes differ). In the pelvis the
    wall thickens (gluteal and hip muscles) and the cavity narrows.
    """
    b = a.body
    box = c.full
    z = box.Z
    wobble = _wobble(b, z)
    pelvis = _smoothstep((-150 - z) / 80.0)
    ax = b.cavity[0] * wobble * (1 - 0.22 * pelvis)
    ant = b.cavity[1] * wobble * (1 - 0.1 * pelvis)
    post = b.cavity[2] * wobble
    wall = b.wall + 40 * pelvis

    def inside(extra_x: np.ndarray, extra_y: np.ndarray) -> np.ndarray:
        semi_y = np.where(box.Y < 0, ant + extra_y, post + 0.7 * extra_y)  # less fat on the back
        return (box.X / (ax + extra_x)) ** 2 + (box.Y / semi_y) ** 2 < 1

    c.body = inside(wall + b.fat, wall + b.fat)
    muscle = inside(wall, wall)
    c.inside = inside(np.zeros_like(z), np.zeros_like(z))
    c.hu[c.body] = a.hu["subcut_fat"]
    c.hu[muscle] = a.hu["muscle"]
    fat = a.hu["visceral_fat"] + 10 * a.fat_field(box)
    c.hu[c.inside] = fat[c.inside]

    # Diaphragm: two domes, highest at each apex, falling toward the costophrenic recesses (deeper
    # behind than in front). Abdominal organs stay below it.
    y2, x2 = box.Y[0], box.X[0]
    recess = np.where(y2 > 0, 60.0, 35.0) * (y2 / 95) ** 2
    dome = np.maximum(b.dome_right - 45 * ((x2 + 60) / 100) ** 2, b.dome_left - 45 * ((x2 - 60) / 100) ** 2) - recess
    c.dome = dome
    c.abdomen = c.inside & (z < dome[None])


def _paint_thorax(c: _Canvas, a: _Anatomy) -> None:
    """Lung bases and the heart's lower surface above the diaphragm (only the top slices)."""
    chest = c.inside & ~c.abdomen
    if not chest.any():
        return
    c.paint(c.full, chest, a.hu["lung"] + 20 * a.texture(c.full), None)
    _paint_blob(c, a, "heart", a.hu["heart"], chest)


def _paint_hollow(c: _Canvas, tube: _Tube, box: _Box, rho: np.ndarray, nearest: np.ndarray, key: str,
                  wall_hu: float, wall_mm: float, lumen_hu: Union[float, np.ndarray], air_level: float,
                  where: np.ndarray) -> None:
    """A hollow viscus: a wall, a lumen and, above ``air_level``, gas.

    The patient lies supine, so gas collects anteriorly: voxels whose offset from the nearest centreline
    point, in radii, is below ``-air_level`` toward anterior (negative y) become air. ``air_level > 1``
    means no gas.
    """
    outer = tube.mask(box, rho, nearest=nearest)
    c.paint(box, outer, wall_hu, key, where)
    lumen = tube.mask(box, rho, shrink_mm=wall_mm, nearest=nearest)
    c.paint(box, lumen, lumen_hu, key, where)
    if air_level < 1:
        rel_y = (box.Y - tube.points[nearest, 1]) / tube.radii[nearest]
        c.paint(box, lumen & (rel_y < -air_level), HU["air"], key, where)


def _paint_bowel(c: _Canvas, a: _Anatomy) -> None:
    """Small bowel loops, colon with gas and stool, and the duodenal C-loop (distractors in btcv)."""
    for tube, fluid, air in a.loops:
        box = c.box(*tube.bounds())
        if box is None:
            continue
        rho, nearest = tube.rho(box)
        lumen = a.hu["bowel_wall"] + fluid * (a.hu["fluid"] - a.hu["bowel_wall"])
        _paint_hollow(c, tube, box, rho, nearest, "small_bowel", a.hu["bowel_wall"], 2.5, lumen, air, c.abdomen)
    for name, air in (("colon", 0.1), ("rectum", 0.5)):
        tube = a.tubes[name]
        box = c.box(*tube.bounds())
        if box is None:
            continue
        rho, nearest = tube.rho(box)
        # Stool is mottled: a fine texture from nearly gas to soft-tissue values.
        stool = a.hu["stool"] + 110 * a.texture(box)
        _paint_hollow(c, tube, box, rho, nearest, name, a.hu["bowel_wall"], 3.0, stool, air, c.abdomen)
    tube = a.tubes["duodenum"]
    box = c.box(*tube.bounds())
    if box is not None:
        rho, nearest = tube.rho(box)
        _paint_hollow(c, tube, box, rho, nearest, "duodenum", a.hu["bowel_wall"], 2.5, a.hu["fluid"], 0.55, c.abdomen)


def _paint_liver(c: _Canvas, a: _Anatomy) -> None:
    """Both lobes, then hepatic veins inside the liver (still labelled liver, as in BTCV and WORD)."""
    hu = _textured(a, "liver")
    for lobe in ("liver_right", "liver_left"):
        _paint_blob(c, a, lobe, hu, c.abdomen, key="liver")
    liver = c.label == c.value("liver")  # the veins are drawn only where the liver is
    for name in ("hepatic_vein_r", "hepatic_vein_m", "hepatic_vein_l"):
        _paint_tube(c, a, name, a.hu["vein"], liver, key="liver")


def _paint_upper_gi(c: _Canvas, a: _Anatomy) -> None:
    """Esophagus first, then the stomach over its lower end (the cardia)."""
    _paint_tube(c, a, "esophagus", a.hu["esophagus"], c.inside, key="esophagus")
    tube = a.tubes["stomach"]
    box = c.box(*tube.bounds())
    if box is not None:
        rho, nearest = tube.rho(box)
        _paint_hollow(c, tube, box, rho, nearest, "stomach", a.hu["stomach_wall"], 5.0, a.hu["fluid"], 0.35,
                      c.abdomen)


def _paint_kidney(c: _Canvas, a: _Anatomy, side: str) -> None:
    """A bean: cortex, darker medulla core, and a fluid pelvis opening at the medial hilum notch."""
    kid = a.blobs[f"kidney_{side}"]
    box = c.box(*kid.bounds())
    if box is None:
        return
    name = f"kidney_{side}"
    rho = kid.rho(box)
    medial = 1.0 if side == "r" else -1.0  # the organ's local +x points medially for the right kidney
    # Notch: an ellipsoid centred on the medial surface removes a bite -> bean shape.
    notch = _Ellipsoid(kid.centre + kid.rot[:, 0] * medial * kid.semi[0] * 1.05,
                       np.array([12.0, 10.0, 20.0]), kid.rot, 0.0, kid.field)
    outer = kid.mask(box, rho) & ~notch.mask(box)
    c.paint(box, outer, a.hu["kidney_cortex"], name, c.abdomen)
    c.paint(box, outer & kid.mask(box, rho, level=0.72), a.hu["kidney_medulla"], name, c.abdomen)
    pelvis = _Ellipsoid(kid.centre + kid.rot[:, 0] * medial * kid.semi[0] * 0.45,
                        np.array([10.0, 8.0, 20.0]), kid.rot, 0.0, kid.field)
    c.paint(box, outer & pelvis.mask(box), a.hu["kidney_pelvis"], name, c.abdomen)


def _paint_vessels(c: _Canvas, a: _Anatomy) -> None:
    """Veins, then arteries; renal veins are built from the sampled kidney and IVC positions."""
    for name in ("smv", "portal_vein", "portal_left", "splenic_vein"):
        _paint_tube(c, a, name, a.hu["portal"], c.inside, key=None if name == "smv" else "portal")
    ivc = a.tubes["ivc"]
    for side in ("r", "l"):
        kid = a.blobs[f"kidney_{side}"]
        medial = 1.0 if side == "r" else -1.0
        hilum = kid.centre + kid.rot[:, 0] * medial * kid.semi[0] * 0.6
        join = ivc.points[np.argmin(np.abs(ivc.points[:, 2] - hilum[2]))]
        mid = (hilum + join) / 2 + np.array([0, -14 if side == "l" else -4, 0])  # left one passes in front of the aorta
        vein = _Tube.through([hilum, mid, join], [5.0, 5.0, 5.5])
        _paint_tube(c, a, "renal_vein", a.hu["vein"], c.inside, tube=vein)
    for name in ("iliac_vein", "iliac_vein_r"):
        _paint_tube(c, a, name, a.hu["ivc"], c.inside)
    _paint_tube(c, a, "ivc", a.hu["ivc"], c.inside, key="ivc")
    for name in ("sma", "iliac_artery", "iliac_artery_r"):
        _paint_tube(c, a, name, a.hu["aorta"], c.inside)
    _paint_tube(c, a, "aorta", a.hu["aorta"], c.inside, key="aorta")


def _paint_pelvis_soft(c: _Canvas, a: _Anatomy) -> None:
    """Bladder with a thin wall (fluid inside)."""
    blob = a.blobs["bladder"]
    box = c.box(*blob.bounds())
    if box is None:
        return
    rho = blob.rho(box)
    c.paint(box, blob.mask(box, rho), a.hu["bowel_wall"], "bladder", c.abdomen)
    c.paint(box, blob.mask(box, rho, level=1 - 3.0 / blob.semi.min()), a.hu["bladder"], "bladder", c.abdomen)


def _paint_musculoskeletal(c: _Canvas, a: _Anatomy) -> None:
    """Psoas and back muscles, spine, ribs, pelvic bones and femoral heads, painted last (bone wins)."""
    for name in ("psoas", "psoas_r", "paraspinal", "paraspinal_r"):
        _paint_tube(c, a, name, a.hu["muscle"], c.body)
    _paint_spine(c, a)
    bone = (a.hu["bone_cortex"] + a.hu["bone_marrow"]) / 2
    for rib in a.ribs:
        _paint_tube(c, a, "rib", bone, c.body, tube=rib)
    for name in ("iliac_wing", "acetabular_roof", "pubic_ramus"):
        for suffix in ("", "_r"):
            _paint_tube(c, a, name + suffix, bone, c.body)
    for side in ("l", "r"):
        _paint_tube(c, a, "femoral_neck" + ("" if side == "l" else "_r"), bone, c.body)
        head = a.blobs[f"femoral_head_{side}"]
        box = c.box(*head.bounds())
        if box is None:
            continue
        rho = head.rho(box)
        hu = np.where(rho > 0.85, a.hu["bone_cortex"], a.hu["bone_marrow"])
        c.paint(box, rho < 1, hu, f"femoral_head_{side}", c.body)


def _paint_spine(c: _Canvas, a: _Anatomy) -> None:
    """Vertebral bodies with discs every ~32 mm, the spinal canal and the posterior arch.

    Below z = -170 the column turns into the sacrum: wider, further back, curving posteriorly.
    """
    box = c.box((-70, 15, -np.inf), (70, 135, np.inf))
    if box is None:
        return
    X, Y, Z = box.X, box.Y, box.Z
    sacrum = _smoothstep((-170 - Z) / 40.0)
    yc = 58 - 6 * _smoothstep((60 - Z) / 150.0) + 0.45 * np.maximum(-170 - Z, 0)
    sx = 22 + 0.02 * (60 - Z) + 20 * sacrum
    sy = 17 + 0.01 * (60 - Z) - 4 * sacrum
    period = 32.0
    phase = np.mod((Z - 7.0) / period, 1.0)
    disc = (phase < 0.22) & (sacrum < 0.5)
    rho = np.sqrt((X / sx) ** 2 + ((Y - yc) / sy) ** 2)
    body = rho < 1
    hu = np.where(disc, a.hu["disc"], np.where(rho > 0.82, a.hu["bone_cortex"], a.hu["bone_marrow"]))
    c.paint(box, body, np.broadcast_to(hu, body.shape), None, c.body)
    # Canal and arch sit behind the body; the arch exists at vertebral levels (not at the discs).
    canal_y = yc + sy + 10 - 3 * sacrum
    r_canal = np.sqrt(X ** 2 + (Y - canal_y) ** 2)
    arch = (r_canal < 16) & (r_canal >= 9) & (Y > canal_y - 6) & ~disc
    spinous = (np.abs(X) < 4) & (Y > canal_y + 12) & (Y < canal_y + 36 - 12 * sacrum) & ~disc & (phase > 0.3)
    transverse = (np.abs(Y - canal_y + 2) < 5) & (np.abs(X) > 12) & (np.abs(X) < 40 - 15 * sacrum) \
        & (phase > 0.4) & (phase < 0.8)
    bone_hu = (a.hu["bone_cortex"] + a.hu["bone_marrow"]) / 2
    c.paint(box, arch | spinous | transverse, bone_hu, None, c.body)
    c.paint(box, np.broadcast_to(r_canal < 9, body.shape) & ~body, a.hu["csf"], None, c.body)


def _apply_scanner(a: _Anatomy, scanner: Scanner, rng: np.random.Generator) -> None:
    """The scanner's changes to a case's anatomy: contrast phase (HU per tissue) and shape variation (a
    log-normal size factor per organ and axis, and per tube)."""
    for tissue, delta in PHASE_HU[scanner.phase].items():
        a.hu[tissue] += delta
    if scanner.shape_variation > 0:
        sd = scanner.shape_variation
        for blob in a.blobs.values():
            blob.semi = blob.semi * np.exp(np.clip(rng.normal(0.0, sd, 3), -2 * sd, 2 * sd))
        for tube in a.tubes.values():
            tube.radii = tube.radii * float(np.exp(np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd)))


def _finish_image(c: _Canvas, a: _Anatomy, rng: np.random.Generator,
                  scanner: Scanner = REFERENCE_SCANNER) -> sitk.Image:
    """Blur (partial-volume edges), add noise, apply the scanner's calibration, round to int16, attach the
    physical geometry."""
    image = sitk.GetImageFromArray(c.hu)
    image.SetSpacing(c.spacing)
    image.SetOrigin(c.origin)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    blurred = sitk.SmoothingRecursiveGaussian(image, [a.blur * scanner.blur_factor * s for s in c.spacing])
    hu = sitk.GetArrayViewFromImage(blurred)
    noisy = hu + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(a.noise_sd * scanner.noise_factor)
    if scanner.intensity_scale != 1.0 or scanner.intensity_offset != 0.0:
        noisy = noisy * np.float32(scanner.intensity_scale) + np.float32(scanner.intensity_offset)
    out = sitk.GetImageFromArray(np.clip(np.rint(noisy), -1024, 3071).astype(np.int16))
    out.CopyInformation(image)
    return out
