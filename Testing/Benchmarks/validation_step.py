"""Validation runs of one incremental step, the tool behind docs/method.md's tables of step settings.

``setup`` writes the integration test's story (8 phantoms at 6 mm, base on spleen, kidneys and liver) and
the new-only labels of stomach and aorta; ``step`` learns them from that base with one strategy and one set
of step options, and scores the result on the *validation* split, never the test split.

    python Testing/Benchmarks/validation_step.py setup --out runs/val [--filters 8,16,32,64]
    python Testing/Benchmarks/validation_step.py step --out runs/val --name lf0 --option lambda_f=0 [--seed 1]
    python Testing/Benchmarks/validation_step.py step --out runs/val --name ft --strategy ft

``step`` also works on a demo's output: ``--base demo_output/story/base/model --manifest
demo_output/phantoms/manifest.json --step-data demo_output/story/step_data/manifest.json --iterations 200``.
Each step prints one line: old and new mean Dice and per-class Dice. One torch thread each
(``OMP_NUM_THREADS=1``) lets two runs share two cores.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.errors import CimisError
from cimis.data.preprocess import PreprocessConfig
from cimis.incremental.base import StepOptions
from cimis.incremental.learn import learn_step
from cimis.model.modelfile import load_card
from cimis.model.network import NetworkConfig
from cimis.story import _mean, evaluate_model, new_only_dataset, single_pass_config
from cimis.train import train_model

SPACING = [6.0, 6.0, 6.0]
PATCH = [48, 48, 32]
OLD = ["spleen", "right kidney", "left kidney", "liver"]
NEW = ["stomach", "aorta"]
ITERATIONS = 250
LEARNING_RATE = 3e-3


def setup(args) -> None:
    out = Path(args.out)
    manifest = Manifest.load(write_phantom_dataset(out / "phantoms", num_cases=8, spacing=tuple(SPACING), seed=3,
                                                   progress=False))
    network = NetworkConfig(arch="unet", filters=[int(f) for f in args.filters.split(",")], strides=[2, 2, 2])
    base = train_model(manifest, out / "base", manifest.classes.subset(OLD), network,
                       PreprocessConfig(spacing=SPACING, patch_size=PATCH),
                       single_pass_config(ITERATIONS, LEARNING_RATE, "cpu"), overwrite=True, progress=False)
    new_only_dataset(manifest, manifest.classes.subset(NEW), out / "step_data")
    dice = evaluate_model(base, manifest, "val", "cpu").mean_dice()
    print(f"base model {base}: validation Dice {json.dumps({k: round(v, 3) for k, v in dice.items()})}")


def step(args) -> None:
    out = Path(args.out)
    base = Path(args.base or out / "base" / "model")
    manifest = Manifest.load(args.manifest or out / "phantoms" / "manifest.json")
    step_data = Manifest.load(args.step_data or out / "step_data" / "manifest.json")
    old, new = load_card(base).classes.names, step_data.classes.names
    options = StepOptions.from_json({k: _value(v) for k, v in (o.split("=", 1) for o in args.option)})
    config = replace(single_pass_config(args.iterations, args.lr, "cpu"), seed=args.seed)
    started = time.perf_counter()
    model = learn_step(base, step_data, out / "steps" / args.name, new, args.strategy, config, options,
                       overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    dice = evaluate_model(model, manifest, "val", "cpu").mean_dice()
    print(f"{args.name} {args.strategy} {args.option} seed {args.seed} ({seconds:.0f} s): "
          f"old {_mean(dice, old):.3f} new {_mean(dice, new):.3f} "
          f"{json.dumps({k: round(v, 2) for k, v in dice.items()})}", flush=True)


def _value(text: str):
    """``0.1`` -> 0.1, ``false`` -> False, ``random`` -> "random"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="phantoms, base model and new-only labels of the integration story")
    p.add_argument("--out", required=True)
    p.add_argument("--filters", default="16,32,64,128", help="UNet channels per level (the small preset's)")
    p.set_defaults(func=setup)
    p = sub.add_parser("step", help="one step, scored on the validation split")
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--strategy", default="pgcd-dapd")
    p.add_argument("--option", action="append", default=[], help="a step option, e.g. lambda_f=0 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=ITERATIONS)
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    p.add_argument("--base", help="default: OUT/base/model")
    p.add_argument("--manifest", help="the full labels (default: OUT/phantoms/manifest.json)")
    p.add_argument("--step-data", help="the new-only labels (default: OUT/step_data/manifest.json)")
    p.set_defaults(func=step)
    args = parser.parse_args()
    try:
        args.func(args)
    except CimisError as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
