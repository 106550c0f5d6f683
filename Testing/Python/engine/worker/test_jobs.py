"""Job files: parsing, defaults, relative paths, and the refusal of every malformed or inconsistent job."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.classes import ClassSet
from cimis.errors import CimisError
from cimis.jobs import check_segment_inputs, check_training_data, load_job, resolve_new_classes


@pytest.fixture
def files(tmp_path):
    """An image and a label map with values 0 and 2 (right kidney), relative to the job file's folder."""
    image = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.int16))
    image.SetSpacing((2.0, 2.0, 3.0))
    label_array = np.zeros((6, 8, 10), np.uint8)
    label_array[2:4, 3:5, 4:6] = 2
    label = sitk.GetImageFromArray(label_array)
    label.CopyInformation(image)
    (tmp_path / "data").mkdir()
    sitk.WriteImage(image, str(tmp_path / "data" / "ct.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "data" / "kidney.nii.gz"))
    return tmp_path


LEARN = {
    "format": "cimis-job/1", "kind": "learn", "registry": "models", "output": "jobs/j1",
    "data": {"classes": [{"name": "right kidney", "value": 2}],
             "cases": [{"image": "data/ct.nii.gz", "label": "data/kidney.nii.gz"}]},
}


def write(folder: Path, job) -> Path:
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    return path


def changed(**changes) -> dict:
    job = copy.deepcopy(LEARN)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = job
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target.setdefault(p, {})
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return job


DELETE = object()


def test_a_learn_job_with_listed_cases(files):
    job = load_job(write(files, LEARN))
    assert job.kind == "learn" and job.id == "j1" and job.device == "auto" and job.threads is None
    assert job.registry == files / "models" and job.output == files / "jobs" / "j1"
    assert job.cancel_file == files / "jobs" / "j1" / "cancel"
    assert job.new_classes.names == ["right kidney"] and job.manifest.classes == job.new_classes
    (case,) = job.manifest.cases_in("train")
    assert case.id == "ct" and case.image == files / "data" / "ct.nii.gz" and job.manifest.cases_in("val") == []
    assert job.settings["strategy"] == "pgcd-dapd" and job.settings["activate"] is True
    assert job.budget.iterations is None


def test_a_segment_job_names_its_outputs_after_the_images(files):
    job = load_job(write(files, {"format": "cimis-job/1", "kind": "segment", "registry": "models", "output": "out",
                                  "segment": {"version": "v2", "format": ".nrrd"},
                                  "data": {"images": ["data/ct.nii.gz", {"id": "b", "image": "data/ct.nii.gz"}]}}))
    assert [(i.id, i.image.name) for i in job.images] == [("ct", "ct.nii.gz"), ("b", "ct.nii.gz")]
    assert job.settings == {"version": "v2", "format": "nrrd"}
    check_segment_inputs(job.images)


def test_a_cancel_file_naming_an_existing_file_is_refused(files):
    """The worker deletes the cancel file it obeys: naming a file that exists (here the user's notes in the
    output folder) must be refused before anything runs, and the file kept."""
    notes = files / "jobs" / "j1" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    for cancel_file in ("jobs/j1/notes.txt", "jobs/j1"):
        with pytest.raises(CimisError, match="cancel") as info:
            load_job(write(files, changed(cancel_file=cancel_file)))
        assert info.value.hint
    (files / "jobs" / "j1" / "cancel").write_text("a user's file")  # the default name, taken by a user's file
    with pytest.raises(CimisError, match="already exists"):
        load_job(write(files, LEARN))
    assert notes.read_text() == "mine" and (files / "jobs" / "j1" / "cancel").read_text() == "a user's file"
    # An empty file is a cancel request made before the worker got to the job file: accepted (it cancels).
    (files / "jobs" / "j1" / "cancel").write_text("")
    assert load_job(write(files, LEARN)).cancel_file == files / "jobs" / "j1" / "cancel"


def test_ids_may_hold_spaces_and_non_ascii_letters(files):
    (files / "data" / "Patient 1 é.nii.gz").write_bytes((files / "data" / "ct.nii.gz").read_bytes())
    job = load_job(write(files, {"format": "cimis-job/1", "kind": "segment", "registry": "models", "output": "out",
                                  "data": {"images": ["data/Patient 1 é.nii.gz", {"id": "foie 2", "image": "data/ct.nii.gz"}]}}))
    assert [i.id for i in job.images] == ["Patient 1 é", "foie 2"]


@pytest.mark.parametrize("changes, message, hint", [
    ({"format": "cimis-job/0"}, "'format' is 'cimis-job/0'", "cimis-job/1"),
    ({"kind": "teach"}, "'kind' is 'teach'", "train, learn, segment"),
    ({"budgte": {}}, "unknown key 'budgte' in the job", "did you mean 'budget'"),
    ({"budget": {"iterations": 0}}, "budget.iterations must be a positive integer", None),
    ({"budget": {"iterations": "10"}}, "budget.iterations must be a positive integer", None),
    ({"budget": {"batch": 2}}, "unknown key 'batch' in 'budget'", "did you mean 'batch_size'"),
    ({"learn": {"base": "v1"}}, "unknown key 'base' in 'learn'", "did you mean 'base_version'"),
    ({"learn": {"learning_rate": -1}}, "learn.learning_rate must be a positive number", None),
    ({"learn": {"activate": "yes"}}, "learn.activate must be true or false", None),
    ({"registry": DELETE}, "the job has no 'registry'", None),
    ({"output": "models/jobs"}, "overlap", None),
    ({"id": "../x"}, "'id' '../x' cannot name a file", None),
    ({"device": "gpu"}, "'device' is 'gpu'", "auto, cpu, cuda"),
    ({"threads": 0}, "'threads' must be a positive integer", None),
    ({"data": DELETE}, "the job has no 'data'", None),
    ({"data__cases__0__image": "data/missing.nii.gz"}, "missing.nii.gz (data.cases[0].image) does not exist", None),
    ({"data__cases__0__label": DELETE}, "data.cases[0] has no 'label'", None),
    ({"data__cases__0__labels": "x"}, "unknown key 'labels' in data.cases[0]", "did you mean 'label'"),
    ({"data__cases__0__split": "test"}, "data.cases[0].split is 'test'", "train or val"),
    ({"data__cases__0__id": "a/b"}, "data.cases[0].id 'a/b' cannot name a file", None),
    ({"data__cases__0__id": ".."}, "data.cases[0].id '..' cannot name a file", None),
    ({"data__cases__0__id": "a\nb"}, "control character", None),
    ({"cancel_file": "data/ct.nii.gz"}, "is not inside the output folder", "new file inside the output folder"),
    ({"cancel_file": "jobs/j1"}, "is not inside the output folder", None),
    ({"cancel_file": "jobs/j1/../j2/cancel"}, "is not inside the output folder", None),
    ({"data__cases__0__split": "val"}, "no case is in the train split", None),
    ({"data__classes": []}, "data.classes must be a non-empty list", None),
    ({"data__classes__0__value": 0}, "label values must be positive", None),
    ({"data__classes__0__colour": [1, 2, 3]}, "unknown key 'colour' in data.classes[0]", "did you mean 'color'"),
    ({"data__manifest": "data/m.json"}, "both 'manifest' and 'cases'", None),
])
def test_malformed_jobs_are_refused_with_the_key_named(files, changes, message, hint):
    with pytest.raises(CimisError) as info:
        load_job(write(files, changed(**changes)))
    assert message in info.value.message and str(files / "job.json") in info.value.message
    if hint:
        assert hint in info.value.hint


def test_unreadable_job_files(tmp_path):
    with pytest.raises(CimisError, match="does not exist"):
        load_job(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"format": "cimis-job/1",}')
    with pytest.raises(CimisError, match="not valid JSON.*line 1 column 26"):
        load_job(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CimisError, match="must be a JSON object"):
        load_job(tmp_path / "list.json")


def test_a_manifest_job_picks_classes_by_name(tmp_path):
    from cimis.data.phantom import write_phantom_dataset

    manifest = write_phantom_dataset(tmp_path / "ds", num_cases=2, spacing=(16.0, 16.0, 16.0), val_cases=0,
                                     test_cases=1, progress=False)
    job = {"format": "cimis-job/1", "kind": "train", "registry": "reg", "output": "out",
           "data": {"manifest": str(manifest), "classes": ["liver", "Spleen"]}}
    parsed = load_job(write(tmp_path, job))
    assert parsed.class_names == ["liver", "Spleen"] and parsed.manifest.cases_in("val") == []
    assert check_training_data(parsed.manifest, parsed.manifest.classes.subset(parsed.class_names)) == 1
    job["data"]["classes"] = ["appendix"]
    with pytest.raises(CimisError, match="unknown classes"):
        load_job(write(tmp_path, job))
    # With a manifest and no class names, a learn job adds every class the model lacks.
    job.update(kind="learn")
    del job["data"]["classes"]
    learn = load_job(write(tmp_path, job))
    old = learn.manifest.classes.subset(["liver", "spleen"])
    assert "liver" not in resolve_new_classes(learn, old).names
    assert len(resolve_new_classes(learn, old)) == len(learn.manifest.classes) - 2


def test_new_classes_must_be_new_in_name_and_value(files):
    job = load_job(write(files, LEARN))
    old = ClassSet.from_names(["liver", "Right Kidney"])
    with pytest.raises(CimisError, match="already has a class named 'Right Kidney'"):
        resolve_new_classes(job, old)
    with pytest.raises(CimisError, match=r"label values \[2\] .* already used by the model for \['spleen'\]"):
        resolve_new_classes(job, ClassSet.from_names(["liver", "spleen"]))
    assert resolve_new_classes(job, ClassSet.from_names(["liver"], first_value=5)).names == ["right kidney"]


def test_training_data_checks_grid_values_and_new_class_voxels(files):
    job = load_job(write(files, LEARN))
    assert check_training_data(job.manifest, job.new_classes) == 1
    label = sitk.ReadImage(str(files / "data" / "kidney.nii.gz"))
    array = sitk.GetArrayFromImage(label)
    for name, values, origin, message in [
        ("empty", np.zeros_like(array), None, "no voxel of any class to learn"),
        ("moved", array, (5.0, 0.0, 0.0), "not on the grid"),
        ("foreign", np.where(array > 0, 9, 0).astype(np.uint8), None, "no voxel of any class to learn"),
        ("mixed", np.where(array > 0, 2, 9).astype(np.uint8), None, "outside the class list"),
    ]:
        bad = sitk.GetImageFromArray(values)
        bad.CopyInformation(label)
        if origin:
            bad.SetOrigin(origin)
        sitk.WriteImage(bad, str(files / "data" / f"{name}.nii.gz"))
        broken = load_job(write(files, changed(data__cases__0__label=f"data/{name}.nii.gz")))
        with pytest.raises(CimisError, match=message):
            check_training_data(broken.manifest, broken.new_classes)


def test_segment_inputs_must_be_3d_volumes(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    (tmp_path / "notes.nii.gz").write_text("not an image")
    job = {"format": "cimis-job/1", "kind": "segment", "registry": "r", "output": "o",
           "data": {"images": ["slice.nii.gz"]}}
    with pytest.raises(CimisError, match="not a 3D scalar volume"):
        check_segment_inputs(load_job(write(tmp_path, job)).images)
    job["data"]["images"] = ["notes.nii.gz"]
    with pytest.raises(CimisError, match="cannot be read as an image"):
        check_segment_inputs(load_job(write(tmp_path, job)).images)
    job["data"]["images"] = ["slice.nii.gz", {"id": "Slice", "image": "slice.nii.gz"}]
    with pytest.raises(CimisError, match="id 'Slice' twice"):
        load_job(write(tmp_path, job))
