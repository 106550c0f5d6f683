"""Iterations per second of ``cimis train`` in one process and with ``--nproc N`` (data-parallel, same
global batch): the scaling figure of docs/benchmarks.md (issue 15).

    python Testing/Benchmarks/ddp_throughput.py --out /tmp/ddp [--nproc 1,2] [--device cpu] [--iterations 40]

Writes phantoms (6 cases, 6 mm), then trains the ``small`` network on 48 x 48 x 32 patches, global batch 4,
once per process count, and prints one line each: seconds per iteration (rank 0's, after the data are
cached, from the model card) and the speed-up over one process. Without ``OMP_NUM_THREADS`` set, one
process uses every core and ``--nproc N`` gives each rank its share, so each run has the whole machine.
On GPUs (``--device cuda``) each rank has its own GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cimis.data.phantom import write_phantom_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--nproc", default="1,2", help="process counts to compare, e.g. 1,2,4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--network", default="small")
    parser.add_argument("--patch", default="48,48,32")
    args = parser.parse_args()
    out = Path(args.out)
    manifest = out / "phantoms" / "manifest.json"
    if not manifest.is_file():
        # No validation case: the timing is of training alone.
        write_phantom_dataset(out / "phantoms", 6, spacing=(6.0, 6.0, 6.0), seed=0, val_cases=0, progress=False)
    first = None
    for nproc in [int(n) for n in args.nproc.split(",")]:
        run = out / f"nproc{nproc}"
        command = [sys.executable, "-m", "cimis.cli", "train", "--manifest", str(manifest), "--out", str(run),
                   "--network", args.network, "--spacing", "6", "--patch", args.patch, "--iterations",
                   str(args.iterations), "--batch-size", str(args.batch_size), "--device", args.device,
                   "--val-every", str(args.iterations), "--checkpoint-every", str(args.iterations), "--overwrite",
                   "--nproc", str(nproc)]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        card = json.loads((run / "model" / "card.json").read_text())
        seconds = card["history"][-1]["seconds_per_iteration"]
        first = first or seconds
        print(f"nproc {nproc}: {seconds:.3f} s/it = {1 / seconds:.2f} it/s, speed-up {first / seconds:.2f}x "
              f"(global batch {args.batch_size}, {args.iterations} iterations, {wall:.0f} s wall in all)", flush=True)


if __name__ == "__main__":
    main()
