"""``python -m cimis.worker.rank JOB.json --device D [--resume] [--base-version V] --owner PID``: one helper
rank (1..N-1) of a train or learn job of several ranks, started by the worker (cimis/worker/ranks.py), which
is rank 0 and sets torch.distributed's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

It runs the same training call as rank 0 and nothing else: no events (stdout goes to stderr), no writes
(rank 0 alone writes checkpoints and the model), no publishing. Its error is one line in
``$CIMIS_RANK_ERRORS/rankR.txt``; it ends itself when the worker (``--owner``) is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback
import warnings
from pathlib import Path

from cimis.errors import user_error_in


def _train(job, device: str, resume: bool, base_version: str | None) -> None:
    from cimis.worker.oom import Attempt

    if job.kind == "train":
        from cimis.worker.train_job import train_in_folder, training_configs

        preprocess, _, config = training_configs(job, device)
        train_in_folder(job, Attempt(device, config.batch_size, tuple(preprocess.patch_size)), resume)
        return
    from cimis.jobs import resolve_new_classes
    from cimis.model.modelfile import load_card
    from cimis.registry import Registry, classes_of
    from cimis.worker.learn_job import learn_in_folder, step_settings

    registry = Registry.open(job.registry)
    base_dir = registry.versions_dir / base_version
    card = load_card(base_dir)
    new = resolve_new_classes(job, card.classes)
    _, _, config = step_settings(job, base_dir, device)
    learn_in_folder(job, base_dir, new.names, Attempt(device, config.batch_size,
                                                        tuple(card.preprocessing.patch_size)), resume)


def _watch_owner(owner: int) -> None:
    """End this rank once the worker is gone (it may have been killed in the middle of a collective)."""
    from cimis.worker.owner_watch import process_alive

    while True:
        threading.Event().wait(0.5)
        if os.getppid() != owner or not process_alive(owner):
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cimis.worker.rank")
    parser.add_argument("job")
    parser.add_argument("--device", required=True)
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--base-version")
    args = parser.parse_args(argv)
    sys.stdout.flush()
    os.dup2(2, 1)  # the worker's stdout is its event stream: nothing of a helper may land there
    threading.Thread(target=_watch_owner, args=(args.owner,), daemon=True).start()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("monai").setLevel(logging.ERROR)
    try:
        from cimis import distributed
        from cimis.jobs import load_job

        job = load_job(args.job)
        if job.threads:
            import torch

            torch.set_num_threads(min(job.threads, os.cpu_count() or 1))
        with distributed.process_group(args.device):
            _train(job, args.device, args.resume, args.base_version)
        return 0
    except BaseException as exc:  # noqa: BLE001 - every way out is one line for the worker
        from cimis.launch import PEER_LOST

        user = user_error_in(exc) if isinstance(exc, Exception) else None
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and not exc.code):
            return 130
        from cimis.worker.oom import is_cuda_oom
        from cimis.worker.ranks import OOM_LINE

        if is_cuda_oom(exc):
            line, code = OOM_LINE, 2
        elif user is None and _lost_peer(exc):
            line, code = PEER_LOST, 2
        elif user is not None:
            line, code = user.one_line(), 2
        else:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            line, code = f"internal error in CIMISLearner ({type(exc).__name__}: {exc})", 1
        folder = os.environ.get("CIMIS_RANK_ERRORS")
        if folder:
            Path(folder, f"rank{os.environ.get('RANK', '?')}.txt").write_text(line.splitlines()[0] + "\n")
        return code


def _lost_peer(exc: BaseException) -> bool:
    from cimis.launch import lost_peer

    return lost_peer(exc) is not None if isinstance(exc, Exception) else False


if __name__ == "__main__":
    sys.exit(main())
