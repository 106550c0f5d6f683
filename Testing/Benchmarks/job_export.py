"""How long the Slicer module blocks its GUI thread writing a CT for a job: gzip-compressed .nrrd (what it
did) against raw .nrrd (what it does), through Slicer's own storage node on ``slicer-core``.

    python Testing/Benchmarks/job_export.py [--size 512 512 300] [--repeat 3]

The CT is the TotalSegmentator example resampled (linearly) to a clinical matrix, so that it compresses
like a real CT rather than like noise or zeros.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from cimis_slicer.context import SlicerContext
from cimis_slicer.volume_files import read_volume

EXAMPLE = Path("/work/shared/data/totalseg_example/example_ct.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ct", type=Path, default=EXAMPLE)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import slicer

    image = sitk.ReadImage(str(args.ct))
    spacing = [sp * n / m for sp, n, m in zip(image.GetSpacing(), image.GetSize(), args.size)]
    big = sitk.Resample(image, args.size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                        image.GetDirection(), -1024, sitk.sitkInt16)
    context = SlicerContext.standalone()
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(big, str(Path(tmp) / "ct.nrrd"))
        volume = read_volume(context.scene, Path(tmp) / "ct.nrrd", "CT")
        for compressed in (True, False):
            times, cpu, size = [], [], 0
            for n in range(args.repeat):
                target = Path(tmp) / f"out-{compressed}-{n}.nrrd"
                storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
                storage.SetFileName(str(target))
                storage.SetUseCompression(compressed)
                context.scene.AddNode(storage)
                started, started_cpu = time.perf_counter(), time.process_time()
                assert storage.WriteData(volume)
                times.append(time.perf_counter() - started)
                cpu.append(time.process_time() - started_cpu)
                context.scene.RemoveNode(storage)
                size = target.stat().st_size
                target.unlink()
            print(f"{'gzip' if compressed else 'raw '} nrrd {'x'.join(map(str, args.size))}: "
                  f"median {sorted(times)[len(times) // 2]:.2f} s wall, {sorted(cpu)[len(cpu) // 2]:.2f} s CPU "
                  f"over {args.repeat}, {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
