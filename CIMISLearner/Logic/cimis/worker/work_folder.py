"""A job's output folder: its state, its checkpoints or label maps, its result and its temporary files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cimis.errors import CimisError
from cimis.registry import read_json_file, verify_model_folder
from cimis.worker.events import jsonable


class WorkFolder:
    """A job's output folder::

        job-state.json   the job, its token and the versions it started from (written when work begins)
        run/             checkpoints and the finished model before it is published (train, learn)
        labels/          label maps (segment)
        result.json      the done event's payload (written just before it)
        tmp/             temporary files of the job's libraries
        cancel           the default cancel file (written by the client)
    """

    def __init__(self, root: Path):
        self.root = root
        self.state_file = root / "job-state.json"
        self.result_file = root / "result.json"
        self.run = root / "run"
        self.labels = root / "labels"
        self.tmp = root / "tmp"

    def holds_a_job(self) -> bool:
        return any(p.exists() for p in (self.state_file, self.result_file, self.run, self.labels))

    def read_state(self) -> dict | None:
        if not self.state_file.exists():
            return None
        return read_json_file(self.state_file, "the job state", "start the job afresh in a new output folder")

    def read_result(self) -> dict | None:
        if not self.result_file.exists():
            return None
        return read_json_file(self.result_file, "the job result")

    TMP_MARKER = ".cimis-job-tmp"  # inside tmp/: the job made this folder and may delete it

    def create(self, state: dict) -> None:
        """Create the folder (the job's first write) and send the libraries' temporary and cache files into it."""
        if self.tmp.exists() and not (self.tmp / self.TMP_MARKER).is_file():
            raise CimisError(f"the output folder {self.root} has a tmp folder that is not the job's",
                             "move it away, or give the job a new output folder")
        self.created_root = not self.root.exists()
        self.created_state = not self.state_file.exists()
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            (self.tmp / self.TMP_MARKER).touch()
        except OSError as exc:
            raise CimisError(f"cannot create the output folder {self.root}: {exc.strerror or exc}",
                             "choose a writable output folder") from None
        write_json(self.state_file, state)
        tempfile.tempdir = str(self.tmp)
        os.environ["TMPDIR"] = str(self.tmp)
        # matplotlib (imported by MONAI) writes a font cache on first import; keep it inside the job too.
        os.environ["MPLCONFIGDIR"] = str(self.tmp / "matplotlib")

    def roll_back(self) -> None:
        """Undo :meth:`create` when the job stops before any work (a bad setting found after the folder was
        made): a refused job leaves nothing behind."""
        import shutil

        if getattr(self, "created_root", False):
            shutil.rmtree(self.root, ignore_errors=True)
            return
        self.remove_tmp()
        if getattr(self, "created_state", False):
            self.state_file.unlink(missing_ok=True)

    def checkpoint_exists(self) -> bool:
        return (self.run / "checkpoint" / "state.json").is_file() or (self.run / "checkpoint.old" / "state.json").is_file()

    def finished_model(self) -> Path | None:
        """``run/model`` if a complete model is there (written by an earlier, killed run of this job)."""
        model = self.run / "model"
        if not model.is_dir():
            return None
        verify_model_folder(model, f"the finished model of this job ({model})")
        return model

    def clean_partial_saves(self) -> None:
        """Remove the temporary siblings a model or checkpoint save leaves when killed (``run/.model.*``)."""
        import shutil

        if self.run.is_dir():
            for item in self.run.iterdir():
                if item.name.startswith((".model.", ".checkpoint.")) and item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)

    def finish(self, result: dict) -> None:
        import shutil

        write_json(self.result_file, result)
        shutil.rmtree(self.run, ignore_errors=True)  # published: the registry holds the model now
        self.remove_tmp()

    def remove_tmp(self) -> None:
        """Delete tmp/ only if the job made it (a user's own tmp/ in a chosen output folder stays)."""
        import shutil

        if (self.tmp / self.TMP_MARKER).is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """The job's state or result file, replaced atomically and fsynced: after a power cut the file holds the
    old or the new content, never a torn one (a torn result would hide a published version)."""
    from cimis.data.io import write_json_atomic

    write_json_atomic(path, jsonable(data), overwrite=True)
