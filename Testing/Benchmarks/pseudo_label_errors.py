"""How often the old model's pseudo-labels are wrong: the easy phantoms against the hard ones.

Writes the hard phantom dataset (``write_phantom_dataset(..., step_scanner=OTHER_SCANNER)``, the data of
``cimis bench --phantom-step-scanner other``), trains a base model on the step-0 organs from the reference
scanner's training cases, and measures its pseudo-labels (cimis/bench/pseudo_label_errors.py) on:

- ``seen``: the base model's own training volumes, which is what the steps of the easy benchmark learn
  from (they reuse step 0's cases);
- ``unseen reference``: new cases from the same scanner (extra seeds, not the dataset's test split);
- ``other scanner``: the steps' volumes of the hard setting (split ``train_steps``).

    python Testing/Benchmarks/pseudo_label_errors.py --out runs/plerr [--cases 13 --spacing 4 --iterations 400]

Prints one Markdown table row per set. One torch thread (``OMP_NUM_THREADS=1``) keeps it polite on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cimis.bench.pseudo_label_errors import pseudo_label_errors
from cimis.data.classes import ClassSet
from cimis.data.manifest import Manifest
from cimis.data.phantom import OTHER_SCANNER, STEP_SPLIT, write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.story import single_pass_config
from cimis.train import train_model

STEP0 = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach"]  # BTCV 7-x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", type=int, default=13, help="as --quick: 13 phantoms (10 train, 1 val, 2 test)")
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--patch", default="48,48,32")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--unseen", type=int, default=3, help="extra reference-scanner cases")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    manifest = Manifest.load(write_phantom_dataset(out / "phantoms", args.cases, spacing=(args.spacing,) * 3,
                                                   val_cases=1, test_cases=2, progress=False,
                                                   step_scanner=OTHER_SCANNER))
    unseen = Manifest.load(write_phantom_dataset(out / "unseen", args.unseen + 1, spacing=(args.spacing,) * 3, seed=7,
                                                 val_cases=0, test_cases=1, progress=False))
    model = out / "base" / "model"
    if not (model / "card.json").is_file():
        preprocess = PreprocessConfig(spacing=[args.spacing] * 3, patch_size=[int(p) for p in args.patch.split(",")])
        train_model(manifest, out / "base", ClassSet([manifest.classes.by_name(n) for n in STEP0]), "small",
                    preprocess, single_pass_config(args.iterations, args.lr, "cpu"), overwrite=True, progress=False)
    trained = time.perf_counter() - started
    rows = {}
    for name, data, split in (("seen (the easy steps' volumes)", manifest, "train"),
                              ("unseen, reference scanner", unseen, "train"),
                              ("other scanner (the hard steps' volumes)", manifest, STEP_SPLIT)):
        rows[name] = pseudo_label_errors(model, data, split)
    print("| volumes | cases | wrong | ignored | old-organ voxels wrong | organ labels wrong |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['cases']} | {r['wrong']:.4f} | {r['ignored']:.4f} | {r['old_organ_wrong']:.4f} | "
              f"{r['organ_label_wrong']:.4f} |")
    print("\nPer old organ: share of its voxels pseudo-labelled otherwise / ignored; share of its pseudo-labels wrong")
    print("| organ | " + " | ".join(rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for organ in STEP0:
        cells = [f"{r['per_class'][organ]['missed']:.3f} / {r['per_class'][organ]['ignored']:.3f} / "
                 f"{r['per_class'][organ]['label_wrong'] or 0:.3f}" for r in rows.values()]
        print(f"| {organ} | " + " | ".join(cells) + " |")
    print(f"\n{trained:.0f} s to write the data and train, {time.perf_counter() - started:.0f} s in all")
    (out / "pseudo_label_errors.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
