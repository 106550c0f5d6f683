"""``cimis train/learn --nproc N``: start N ranks of the same command with PyTorch's torchrun machinery
(torch.distributed.run's elastic launcher, on this machine) and report their outcome as one line.

Each rank runs ``python -m cimis.cli`` with the same arguments under torchrun's environment
(cimis/distributed.py joins them into one process group). A rank that fails stops the others (torchrun's
agent ends them); the ranks write their error line to a file here instead of the terminal, and this
process prints the one that explains the failure. The command line's side of it (``launch_ranks``,
``report_error``, ``lost_peer``) lives here too, so that cimis/cli.py only calls it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from cimis.errors import CimisError

# A rank launched by --nproc writes its error line to RANK_ERRORS_ENV/rank{R}.txt (cimis.cli.main).
RANK_ERRORS_ENV = "CIMIS_RANK_ERRORS"
# The line a rank writes when a collective failed because another rank went away.
PEER_LOST = "another training process stopped"


# ------------------------------------------------------------------------------ for the command line
def launch_ranks(args) -> bool:
    """``--nproc N`` (``args.nproc``): start N ranks of this very command, wait for them and report; True
    when done so. Under torchrun the command is one of the ranks and runs on (cimis/distributed.py)."""
    from cimis import distributed

    if distributed.launched():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if args.nproc not in (None, per_node):
            raise CimisError(f"--nproc {args.nproc} differs from torchrun's {per_node} processes",
                             "give --nproc or start with torchrun, not both")
        return False
    if (args.nproc or 1) == 1:
        return False
    launch(args.argv, args.nproc, args.device, args.out)
    print(f"model written to {Path(args.out) / 'model'}")
    return True


def reports_result() -> bool:
    """Whether this process prints the command's result: rank 0, unless --nproc's launcher does."""
    from cimis import distributed

    return distributed.is_main() and not os.environ.get(RANK_ERRORS_ENV)


def report_error(line: str) -> None:
    """Print ``error: line``; a rank started by ``--nproc`` leaves it to its launcher, which prints the one
    line that explains a failure."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder and os.environ.get("RANK"):
        Path(folder, f"rank{os.environ['RANK']}.txt").write_text(line + "\n")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK"):
        line = f"process {os.environ['RANK']}: {line}"  # under torchrun every rank speaks
    print(f"error: {line}", file=sys.stderr)


def lost_peer(exc: BaseException) -> CimisError | None:
    """A collective that failed because another rank went away, worded for the user."""
    from cimis import distributed

    if not distributed.launched():
        return None
    import torch.distributed as dist

    text = str(exc)
    words = ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")
    if isinstance(exc, getattr(dist, "DistError", ())) or any(word in text for word in words):  # DistError: torch >= 2.1
        return CimisError(f"{PEER_LOST} ({text.splitlines()[0][:160] if text else type(exc).__name__})",
                          "the last checkpoint is kept: run the same command with --resume to continue")
    return None


# ------------------------------------------------------------------------------------------- launching
def available_slots(device: str) -> tuple[int, str]:
    """How many ranks this machine can hold for ``--device``: its GPUs, or (CPU) its usable cores."""
    import torch

    from cimis.distributed import wants_gpu

    if wants_gpu(device):
        return torch.cuda.device_count(), "GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU cores"


def check_nproc(nproc: int, device: str) -> None:
    slots, what = available_slots(device)
    if nproc > slots:
        raise CimisError(f"--nproc {nproc} asks for more processes than the {slots} {what} here",
                         f"use --nproc {slots} or fewer" if slots > 1 else "leave out --nproc")


def master_port() -> int:
    """``MASTER_PORT`` when set (refused when another program holds it), else a free port."""
    wanted = os.environ.get("MASTER_PORT")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", int(wanted) if wanted else 0))
        except ValueError:
            raise CimisError(f"MASTER_PORT={wanted!r} is not a port number", "unset it to pick a free port") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CimisError(f"port {wanted} (MASTER_PORT) is in use by another program",
                                 "set MASTER_PORT to a free port, or unset it to pick one") from None
            raise CimisError(f"cannot use port {wanted} (MASTER_PORT): {exc.strerror}",
                             "set MASTER_PORT to a free port, or unset it to pick one") from None
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int, device: str, run_dir: str | Path) -> None:
    """Run ``cimis <argv>`` as ``nproc`` ranks on this machine; returns when all succeeded, else raises
    :class:`CimisError` with the failing rank's own error line (or how it died)."""
    check_nproc(nproc, device)
    port = master_port()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's own log lines (start, stop, its summary of a failure) are replaced by our one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL + 1)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", RANK_ERRORS_ENV)}
    with tempfile.TemporaryDirectory(prefix="cimis-ranks-") as errors:
        os.environ[RANK_ERRORS_ENV] = errors
        if saved_env["OMP_NUM_THREADS"] is None:  # share the cores instead of every rank using them all
            os.environ["OMP_NUM_THREADS"] = str(max(1, available_slots("cpu")[0] // nproc))
        try:
            elastic_launch(config, sys.executable)("-m", "cimis.cli", *argv)
        except ChildFailedError as exc:
            if sys.stderr.isatty():
                sys.stderr.write("\n")  # after the progress bar of a rank that was stopped mid-line
            raise CimisError(*_explain(exc, Path(errors), nproc, Path(run_dir))) from None
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the launcher itself failed (the rendezvous port taken meanwhile)
            raise CimisError(f"could not start the {nproc} training processes ({str(exc).splitlines()[0][:200]})",
                             "run again; set MASTER_PORT to a free port if it persists") from None
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _explain(exc, errors: Path, nproc: int, run_dir: Path) -> tuple[str, str | None]:
    """The failure's one line: a rank's own error (not "another stopped") first, then a rank that died
    without one (killed), then whatever a rank said."""
    lines = {int(p.stem[4:]): p.read_text().strip() for p in errors.glob("rank*.txt") if p.stem[4:].isdigit()}
    own = sorted((r, line) for r, line in lines.items() if PEER_LOST not in line)
    if own:
        rank, line = own[0]
        return line if nproc == 1 else f"process {rank} of {nproc}: {line}", None
    resume = "run the same command with --resume to continue from its last checkpoint" if \
        any((run_dir / name / "state.json").is_file() for name in ("checkpoint", "checkpoint.old")) else \
        "run the same command again"
    # The agent ends the others with SIGTERM once one failed: the first failure, not one of those, is the cause.
    for rank, failure in sorted(exc.failures.items(), key=lambda rf: (rf[1].exitcode == -signal.SIGTERM,
                                                                      rf[1].timestamp, rf[0])):
        if rank not in lines:
            code = failure.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ \
                else f"stopped with exit status {code}"
            return f"training process {rank} of {nproc} {how}; the others were stopped", resume
    rank, line = sorted(lines.items())[0]
    return f"process {rank} of {nproc}: {line}", resume
