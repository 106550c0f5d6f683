"""SimpleITK <-> MONAI conversion keeps geometry; model-space transforms reorient and resample."""

import numpy as np
import SimpleITK as sitk

from cimis.data.preprocess import PreprocessConfig, metatensor_to_sitk, model_space_transforms, sitk_to_metatensor


def _oblique_image():
    array = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-12.0, 30.5, 4.0))
    angle = 0.3
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, -1))
    return image


def test_round_trip_keeps_voxels_and_geometry():
    image = _oblique_image()
    back = metatensor_to_sitk(sitk_to_metatensor(image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)


def test_affine_maps_voxels_to_the_same_physical_points_in_ras():
    image = _oblique_image()
    tensor = sitk_to_metatensor(image)
    index = (3, 5, 2)
    lps = np.array(image.TransformIndexToPhysicalPoint(index))
    ras = (tensor.affine.numpy() @ np.array([*index, 1.0]))[:3]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1])


def test_model_space_is_ras_at_target_spacing_and_windowed():
    image = sitk.GetImageFromArray(np.full((10, 20, 30), 1000, dtype=np.int16))
    image.SetSpacing((2.0, 2.0, 2.0))
    out = model_space_transforms(PreprocessConfig(spacing=[4.0, 4.0, 4.0]), with_label=False)({"image": sitk_to_metatensor(image)})
    # (x, y, z) = (30, 20, 10) voxels of 2 mm -> about half as many voxels of 4 mm
    assert all(abs(n - m) <= 1 for n, m in zip(out["image"].shape[1:], (15, 10, 5)))
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], [4.0, 4.0, 4.0])
    assert float(out["image"].max()) == 1.0  # 1000 HU is above the window: clipped to 1
