"""Fixtures for the bridge tests, which run Slicer's real C++ classes from the ``slicer-core`` wheel.

A phantom CT at 10 mm (38x32x24 voxels), a standalone Slicer scene, and one tiny base model (liver, spleen,
aorta) trained once per session by the real worker subprocess (cimis_slicer.round_trip, which the module's
in-Slicer self-test uses too).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the bridge tests need the slicer-core wheel (requirements-dev.txt)")

from cimis_slicer.context import SlicerContext  # noqa: E402
from cimis_slicer.volume_files import read_volume  # noqa: E402
from cimis_slicer.workflow import Workflow  # noqa: E402

from cimis_slicer.round_trip import (BASE_CLASSES, NEW_CLASS, TINY_NETWORK, TINY_PREPROCESS, WORKER_ENV,  # noqa: E402,F401
                                      make_base_registry,
                                      tiny_settings, wait, write_phantom_ct)


@pytest.fixture(scope="session")
def kit():
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory) -> dict:
    """The CT the clinician opens (NIfTI) and its reference labels as an array ``[k, j, i]``."""
    ct, labels, classes = write_phantom_ct(tmp_path_factory.mktemp("phantom"))
    return {"ct": ct, "labels": labels, "classes": classes}


@pytest.fixture
def context() -> SlicerContext:
    return SlicerContext.standalone()


@pytest.fixture
def ct(context, phantom_files):
    volume = read_volume(context.scene, phantom_files["ct"], "CT")
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    return volume


@pytest.fixture(scope="session")
def base_registry(tmp_path_factory) -> Path:
    """A registry whose active version (v0001) knows liver, spleen and aorta: a tiny train job run by the
    real worker, started through the bridge's process control."""
    return make_base_registry(tmp_path_factory.mktemp("base"))


@pytest.fixture
def registry_copy(base_registry, tmp_path) -> Path:
    """A private copy of the base registry, so a test's new versions do not leak into another test."""
    target = tmp_path / "registry"
    shutil.copytree(base_registry, target)
    for path in target.rglob("*"):  # versions are read-only by design; the copy must be removable
        path.chmod(path.stat().st_mode | 0o200)
    return target


@pytest.fixture
def workflow(context, registry_copy, tmp_path) -> Workflow:
    flow = Workflow(context, registry_copy, tmp_path / "jobs", env=WORKER_ENV)
    yield flow
    flow.shutdown()


def scene_snapshot(scene) -> dict:
    """Every node's ID, class, name and content fingerprint, to prove a failure changed nothing."""
    from cimis_slicer.segments import segments_of
    from cimis_slicer.volumes import array_from_volume

    snap = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        entry = [node.GetClassName(), node.GetName()]
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
            entry.append(float(np.sum(array_from_volume(node), dtype=np.float64)))
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            entry.append([(s.id, s.name, s.color, painted_in(node, s.id)) for s in segments_of(node)])
        snap[node.GetID()] = entry
    return snap


def painted_in(segmentation_node, segment_id: str) -> int:
    """Voxels of one segment, read from its internal labelmap (which may be shared with other segments)."""
    import slicer.util

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id) is None:
        return 0
    array = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id)
    return int(np.count_nonzero(array == segment.GetLabelValue()))
