"""The sample CT in Sample Data: registered with files Slicer can fetch, verify and load, and made reproducibly.

Slicer's Sample Data module is part of the Slicer application, not of the ``slicer-core`` wheel (``import
SampleData`` fails here), so registration is recorded by a stand-in with the exact signature of
``SampleData.SampleDataLogic``'s registration methods, and what Sample Data does next is done with the real
pieces it uses: ``urllib`` fetches the ``file://`` URI into a cache folder, ``slicer.util`` checks the
checksum, and Slicer's volumes and segmentations logics (the readers' back ends) load the files. The
module's in-Slicer self-test loads the sample through the real Sample Data module.
"""

from __future__ import annotations

import importlib.util
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer.util

from cimis_slicer.context import SlicerContext
from cimis_slicer.sample_data import (CATEGORY, CT_FILE, ORGANS_FILE, PHANTOM_SPACING_MM, SAMPLE_FILES, SAMPLE_NAME,
                                      THUMBNAIL, load_sample_file, register_sample_data, sample_problems,
                                      write_sample_volumes)
from cimis_slicer.segments import export_label_array, segments_of
from cimis_slicer.volumes import add_volume_from_array, array_from_volume, geometry_of

RESOURCES = Path(__file__).resolve().parents[3] / "CIMISLearner" / "Resources"


class StandInSampleDataLogic:
    """Records registrations; the parameters are those of Slicer's ``SampleDataLogic`` (Slicer 5.11), so
    a misspelt keyword fails here as it would in Slicer."""

    categories: dict = {}
    sources: list = []

    @staticmethod
    def registerCustomSampleDataCategory(category, title):
        StandInSampleDataLogic.categories[category] = title

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None,
                                       loadFileType=None):
        StandInSampleDataLogic.sources.append(dict(
            category=category, sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
            thumbnailFileName=thumbnailFileName, loadFileTypes=loadFileTypes, checksums=checksums))


class OlderSlicerSampleDataLogic:
    """Slicer releases before 5.11 have no ``registerCustomSampleDataCategory``."""

    sources: list = []

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None,
                                       loadFileType=None):
        OlderSlicerSampleDataLogic.sources.append((category, sampleName))


@pytest.fixture
def registered() -> dict:
    assert importlib.util.find_spec("SampleData") is None, \
        "Slicer's SampleData module is importable here: register through it instead of the stand-in"
    StandInSampleDataLogic.categories, StandInSampleDataLogic.sources = {}, []
    register_sample_data(StandInSampleDataLogic, RESOURCES)
    assert len(StandInSampleDataLogic.sources) == 1
    return StandInSampleDataLogic.sources[0]


def fetch_as_sample_data_does(uri: str, file_name: str, checksum: str, cache: Path) -> Path:
    """What ``SampleDataLogic.downloadFile`` does: fetch the URI into the cache, then compare the checksum."""
    algorithm, digest = slicer.util.extractAlgoAndDigest(checksum)
    path = cache / file_name
    urllib.request.urlretrieve(uri, path)
    assert slicer.util.computeChecksum(algorithm, str(path)) == digest, f"{file_name}: checksum differs"
    return path


def test_the_sample_is_registered_under_the_module_with_files_that_load_as_a_ct_and_its_organs(registered,
                                                                                               tmp_path):
    assert StandInSampleDataLogic.categories == {CATEGORY: "CIMISLearner"}
    assert registered["category"] == CATEGORY and registered["sampleName"] == SAMPLE_NAME
    count = len(registered["uris"])
    # SampleDataSource refuses lists of different lengths.
    assert count == 2 and all(len(registered[key]) == count
                              for key in ("fileNames", "nodeNames", "checksums", "loadFileTypes"))
    assert registered["nodeNames"] == ["PhantomCT", "PhantomCT organs"]
    assert Path(registered["thumbnailFileName"]) == (RESOURCES / THUMBNAIL).resolve()
    assert Path(registered["thumbnailFileName"]).is_file()

    context = SlicerContext.standalone()
    nodes = []
    for uri, name, checksum, sample_file in zip(registered["uris"], registered["fileNames"],
                                                registered["checksums"], SAMPLE_FILES):
        assert uri.startswith("file://") and checksum.startswith("SHA256:")
        path = fetch_as_sample_data_does(uri, name, checksum, tmp_path)
        nodes.append(load_sample_file(context, sample_file, path))
    ct, organs = nodes
    assert ct.GetName() == "PhantomCT" and organs.GetName() == "PhantomCT organs"
    assert sample_problems(ct, organs) == []
    # What Train a first model and Learn send: the organs exported on the CT's grid, as the file holds them.
    sent = export_label_array(context, organs, [s.id for s in segments_of(organs)], ct)
    in_file = sitk.GetArrayFromImage(sitk.ReadImage(str(RESOURCES / ORGANS_FILE.relative_path)))
    assert np.array_equal(sent > 0, in_file > 0) and len(np.unique(sent)) == 14


def test_an_older_slicer_without_category_titles_still_gets_the_sample():
    OlderSlicerSampleDataLogic.sources = []
    register_sample_data(OlderSlicerSampleDataLogic, RESOURCES)
    assert OlderSlicerSampleDataLogic.sources == [(CATEGORY, SAMPLE_NAME)]


def test_the_shipped_files_are_small_and_simpleitk_reads_a_ct_with_its_organs_on_the_same_grid():
    sizes = {f.relative_path: (RESOURCES / f.relative_path).stat().st_size for f in SAMPLE_FILES}
    sizes[THUMBNAIL] = (RESOURCES / THUMBNAIL).stat().st_size
    assert sum(sizes.values()) < 400_000, sizes  # they ship in the extension package

    ct = sitk.ReadImage(str(RESOURCES / CT_FILE.relative_path))
    voxels = sitk.GetArrayFromImage(ct)
    assert ct.GetDimension() == 3 and min(ct.GetSize()) > 10
    assert ct.GetPixelID() == sitk.sitkInt16
    assert np.allclose(ct.GetSpacing(), PHANTOM_SPACING_MM)
    assert voxels.min() <= -1000 and 200 < voxels.max() < 3000  # air and bone, in Hounsfield units
    # A .seg.nrrd is a NRRD: its label layer lies on the CT's grid.
    organs = sitk.ReadImage(str(RESOURCES / ORGANS_FILE.relative_path))
    assert organs.GetSize() == ct.GetSize()
    assert np.allclose(organs.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    assert np.allclose(organs.GetSpacing(), ct.GetSpacing()) and np.allclose(organs.GetDirection(), ct.GetDirection())
    labels = sitk.GetArrayFromImage(organs)
    assert len(np.unique(labels)) == 14  # background and the 13 organs
    assert np.median(voxels[labels == 6]) > 0  # liver (label 6) is soft tissue, not air


def test_the_shipped_files_are_the_seeded_phantom_that_the_writer_makes_again(tmp_path):
    written = write_sample_volumes(tmp_path)
    for shipped, again in zip((RESOURCES / f.relative_path for f in SAMPLE_FILES), written):
        # Voxels, not bytes: another zlib may compress the same voxels differently.
        a, b = sitk.ReadImage(str(shipped)), sitk.ReadImage(str(again))
        assert a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), shipped.name


def test_the_check_names_a_ct_on_another_grid_than_its_organs(tmp_path):
    context = SlicerContext.standalone()
    ct, organs = (load_sample_file(context, f, RESOURCES / f.relative_path) for f in SAMPLE_FILES)
    other = geometry_of(ct).ijk_to_ras.copy()
    other[:3, :3] *= 0.8
    resized = add_volume_from_array(context.scene, array_from_volume(ct), other, "4 mm")
    problems = sample_problems(resized, organs)
    assert len(problems) == 2
    assert "spacing" in problems[0] and "not on the CT's grid" in problems[1]
    assert "not loaded as a segmentation" in sample_problems(ct, None)[0]
