"""The ``cimis`` command: ``phantom``, ``manifest``, ``train``, ``learn``, ``segment``, ``evaluate``, ``demo``, ``story``,
``import-model`` and ``export`` (cimis/model/import_command.py, export_bundle.py),
``bench`` (cimis/bench/), ``worker`` (one job file, JSON events on stdout: cimis/worker/) and ``models`` (the registry: cimis/registry/).

Every subcommand turns user mistakes into one ``error: ...`` line on stderr and exit status 2; warnings
are one ``warning: ...`` line each. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from cimis.arguments import (  # the option value types, shared with cimis bench (bench/command.py)
    count as _count,
    floats as _floats,
    ints as _ints,
    names as _names,
    non_negative_number as _non_negative_number,
    positive_number as _positive_number,
    value_range as _range,
    window as _window,
)
from cimis.errors import CimisError, printable, user_error_in
from cimis.launch import launch_ranks, lost_peer, report_error, reports_result


class _Parser(argparse.ArgumentParser):
    """argparse with the house style for mistakes on the command line: one ``error:`` line, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {printable(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------- commands
def cmd_phantom(args) -> None:
    from cimis.data.phantom import write_phantom_dataset

    path = write_phantom_dataset(args.out, args.cases, args.variant, tuple(args.spacing), args.seed,
                                 args.val_cases, args.test_cases)
    print(f"wrote {args.cases} phantom cases and {path}")


def cmd_manifest(args) -> None:
    from cimis.data.adapters import build_manifest, detect_layout

    kind = args.kind if args.kind != "auto" else detect_layout(args.root)
    manifest = build_manifest(kind, args.root)
    manifest.save(args.out, overwrite=args.overwrite)
    counts = ", ".join(f"{k}: {len(v)}" for k, v in manifest.splits.items())
    print(f"{kind} dataset, {len(manifest.cases)} cases ({counts}), {len(manifest.classes)} classes -> {args.out}")


def cmd_train(args) -> None:
    from cimis import distributed
    from cimis.data.manifest import Manifest
    from cimis.data.preprocess import PreprocessConfig
    from cimis.train import TrainConfig, train_model

    manifest = Manifest.load(args.manifest)
    classes = manifest.classes.subset(args.classes) if args.classes else manifest.classes
    preprocess = PreprocessConfig(spacing=args.spacing, patch_size=args.patch, window=args.window)
    config = TrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
        device=args.device, amp=not args.no_amp, num_workers=args.workers, cache=not args.no_cache,
        augment=not args.no_augment, val_every=args.val_every or max(args.iterations // 4, 1),
        checkpoint_every=args.checkpoint_every or max(args.iterations // 4, 1),
    )
    if launch_ranks(args):  # --nproc: this process starts the ranks (docs/distributed.md)
        return
    with distributed.process_group(args.device):
        model = train_model(manifest, args.out, classes, args.network, preprocess, config, resume=args.resume,
                            overwrite=args.overwrite)
        if reports_result():
            print(f"model written to {model}")


def cmd_learn(args) -> None:
    from dataclasses import replace

    from cimis import distributed
    from cimis.data.manifest import Manifest
    from cimis.incremental.base import StepOptions
    from cimis.incremental.learn import learn_step, default_step_config
    from cimis.incremental.method_settings import load_method_settings, parse_option_overrides
    from cimis.model.modelfile import load_card

    settings = load_method_settings(args.method_settings)
    manifest = Manifest.load(args.manifest)
    config = default_step_config(load_card(args.model), args.strategy, settings)
    overrides = {k: v for k, v in {
        "iterations": args.iterations, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
    }.items() if v is not None}
    config = replace(config, device=args.device, **overrides)
    config = replace(config, val_every=args.val_every or max(config.iterations // 4, 1),
                     checkpoint_every=args.checkpoint_every or max(config.iterations // 4, 1))
    chosen = {switch: False for switch in args.off or []}
    chosen.update(parse_option_overrides(args.option))
    chosen.update({k: v for k, v in {"head_init": args.head_init, "lambda_f": args.lambda_f}.items() if v is not None})
    options = StepOptions.from_json(chosen)  # what is left unset comes from the method settings
    if launch_ranks(args):  # --nproc: this process starts the ranks (docs/distributed.md)
        return
    with distributed.process_group(args.device):
        model = learn_step(args.model, manifest, args.out, args.new_classes, args.strategy, config, options,
                           resume=args.resume, overwrite=args.overwrite, method_settings=settings)
        if reports_result():
            print(f"model written to {model}")


def cmd_segment(args) -> None:
    from cimis.data.io import read_image, write_image
    from cimis.infer import segment_image
    from cimis.metrics import format_class_table
    from cimis.model.modelfile import load_model

    seg_path = None
    if args.dicom_seg is not None:  # checked before the model runs, so a bad request writes nothing
        from cimis.data.dicom_seg import check_seg_request, default_seg_path

        if args.manifest or not args.input:
            raise CimisError("--dicom-seg needs one --input DICOM series folder (not --manifest)")
        seg_path = Path(args.dicom_seg) if args.dicom_seg else default_seg_path(args.output)
        check_seg_request(args.input, seg_path, args.overwrite)
    net, card = load_model(args.model)
    if args.manifest:
        from cimis.data.manifest import Manifest

        output = Path(args.output)
        if output.exists() and not output.is_dir():
            raise CimisError(f"{output} is a file; with --manifest, --output is a folder", "give a folder for --output")
        # Case ids are checked as file names when the manifest is read, so every target lies in --output.
        jobs = [(c.image, output / f"{c.id}.nii.gz") for c in Manifest.load(args.manifest).cases_in(args.split)]
    else:
        if not args.input:
            raise CimisError("give --input IMAGE (or --manifest with --split)")
        jobs = [(Path(args.input), Path(args.output))]
    for source, target in jobs:
        result = segment_image(net, card, read_image(source), device=args.device, progress=True, source=str(source))
        write_image(result.label, target, overwrite=args.overwrite)
        print(f"{source} -> {target}")
        if seg_path is not None:
            from cimis.data.dicom_seg import SegAlgorithm, write_dicom_seg

            algorithm = SegAlgorithm(f"CIMISLearner {Path(args.model).resolve().name}"[:64],
                                     f"cimis {card.cimis_version} {card.created}".strip()[:64])
            write_dicom_seg(source, result.label, card.classes, seg_path, algorithm, overwrite=args.overwrite)
            print(f"{source} -> {seg_path} (DICOM SEG)")
        print(format_class_table({k: {"volume (mL)": v} for k, v in result.volumes_ml.items()}, ["volume (mL)"]))


def cmd_evaluate(args) -> None:
    from cimis.evaluate import evaluate_folder, evaluate_pair

    if args.manifest:
        if not args.predictions:
            raise CimisError("give --predictions DIR with --manifest")
        report = evaluate_folder(args.manifest, args.split, args.predictions, hd95=args.hd95)
    else:
        if not (args.pred and args.ref and args.classes_from):
            raise CimisError("give --manifest and --predictions, or --pred, --ref and --classes-from")
        report = evaluate_pair(args.pred, args.ref, args.classes_from, hd95=args.hd95)
    paths = report.write(args.out, overwrite=args.overwrite)
    print(report.to_markdown())
    print("written: " + ", ".join(str(p) for p in paths.values()))


def cmd_demo(args) -> None:
    from cimis.demo import run_demo

    run_demo(Path(args.out), device=args.device, overwrite=args.overwrite, segmentation_only=args.segmentation_only)


def cmd_story(args) -> None:
    from cimis.realct import run_manifest_story, run_real_ct_story

    budgets = {k: v for k, v in (("base_iterations", args.base_iterations),
                                 ("step_iterations", args.step_iterations)) if v is not None}
    if args.manifest:
        run_manifest_story(Path(args.manifest), Path(args.out), args.old, args.new, args.spacing,
                           device=args.device, overwrite=args.overwrite, **budgets)
    else:
        if args.old or args.new or args.spacing:
            raise CimisError("--old, --new and --spacing apply to --manifest",
                             "the --totalseg story uses its fixed organs and the CT's 3 mm spacing")
        run_real_ct_story(Path(args.totalseg), Path(args.out), device=args.device, overwrite=args.overwrite, **budgets)


def cmd_bench(args) -> None:
    from cimis.bench.command import bench_command

    bench_command(args)


def cmd_worker(args) -> None:
    from cimis.worker import worker_main

    # The worker reports everything, errors included, as events; its exit status is the protocol's.
    sys.exit(worker_main(args.job, resume=args.resume))


def cmd_import_model(args) -> None:
    from cimis.model.import_command import import_model
    from cimis.model.monai_bundle import BundleOverrides

    overrides = BundleOverrides(spacing=args.spacing, window=args.window, intensity_range=args.intensity_range,
                                patch_size=args.patch_size, classes=args.classes)
    folder, card = import_model(args.source, args.out, classes=args.classes, fold=args.fold, volumes=args.volumes,
                                overrides=overrides, device=args.device, overwrite=args.overwrite)
    entry = card.history[0]
    print(f"imported {entry['builder']} from {args.source} -> {folder}")
    names = card.classes.names
    print(f"{len(names)} classes: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}")
    for note in entry.get("notes", []):
        print(f"note: {note}")
    if not args.volumes:
        print("note: no --volumes: the first `cimis learn` step computes the prototypes from its own images")


def cmd_export(args) -> None:
    from cimis.model.export_bundle import export_monai_bundle

    folder = export_monai_bundle(args.model, args.out, overwrite=args.overwrite)
    print(f"wrote MONAI bundle {folder}")


def cmd_models(args) -> None:
    from cimis.registry import models_command

    models_command(args)


# ------------------------------------------------------------------------------------------------ parser
NPROC_HELP = ("data-parallel training in N processes on this machine, one per GPU (or sharing the CPU "
              "cores); the batch size is split over them (docs/distributed.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cimis", description="Class-incremental 3D CT segmentation (CIMISLearner).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a dataset of synthetic abdominal CT phantoms")
    p.add_argument("--out", required=True, help="output folder (gets imagesTr/, labelsTr/, manifest.json)")
    p.add_argument("--cases", type=_count(1), default=12)
    p.add_argument("--variant", choices=["btcv", "word"], default="btcv", help="13 BTCV or 16 WORD classes")
    p.add_argument("--spacing", type=_floats, default=[3.0, 3.0, 3.0], help="voxel spacing in mm, e.g. 3 or 3,3,4")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--val-cases", type=_count(0), default=1)
    p.add_argument("--test-cases", type=_count(0), default=1)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("manifest", help="write a manifest for a dataset in its public on-disk layout")
    p.add_argument("root", help="dataset folder")
    p.add_argument("--from", dest="kind", choices=["auto", "btcv", "word", "decathlon", "totalseg"], default="auto")
    p.add_argument("--out", required=True, help="manifest JSON to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("train", help="train a model on all (or chosen) classes of a manifest")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="run folder: the model goes to OUT/model, checkpoints to OUT/checkpoint")
    p.add_argument("--classes", type=_names, help="comma-separated class names or values (default: all)")
    p.add_argument("--network", choices=["small", "dynunet"], default="dynunet")
    p.add_argument("--spacing", type=_floats, default=[1.5, 1.5, 2.0], help="model-space spacing in mm")
    p.add_argument("--patch", type=_ints, default=[96, 96, 96], help="patch size in voxels")
    p.add_argument("--window", type=_window, default=[-175.0, 250.0], help="CT window low,high in HU")
    p.add_argument("--iterations", type=_count(1), default=1000)
    p.add_argument("--batch-size", type=_count(1), default=2)
    p.add_argument("--lr", type=_positive_number, default=2e-3)
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=_count(0), default=0, help="data-loader processes")
    p.add_argument("--val-every", type=_count(0), default=0, help="iterations between validations (default: a quarter)")
    p.add_argument("--checkpoint-every", type=_count(0), default=0, help="iterations between checkpoints (default: a quarter)")
    p.add_argument("--no-amp", action="store_true", help="full precision on the GPU")
    p.add_argument("--no-cache", action="store_true", help="do not keep preprocessed volumes in memory")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--nproc", type=_count(1), help=NPROC_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("learn", help="one incremental step: learn new classes from new-only labels")
    p.add_argument("--model", required=True, help="the previous model folder")
    p.add_argument("--manifest", required=True, help="dataset whose labels carry only the new classes")
    p.add_argument("--out", required=True, help="run folder: the new model goes to OUT/model")
    p.add_argument("--new-classes", type=_names, help="names of the classes to learn (default: the dataset's classes the model lacks)")
    p.add_argument("--strategy", default="pgcd-dapd",
                   choices=["pgcd-dapd", "ft", "pseudo-labels", "lwf", "ilt", "mib", "plop", "joint"])
    p.add_argument("--off", type=_names, help="ablation: comma-separated switches to turn off (pseudo_labels, spatial_weight, "
                   "channel_weight, output_term, dapd_global, dapd_local, dynamic_background)")
    p.add_argument("--head-init", choices=["balanced", "random"],
                   help="how the new output channels start (default: the method settings'; docs/method.md)")
    p.add_argument("--lambda-f", type=_non_negative_number,
                   help="pgcd-dapd: weight of PGCD's feature term (default 0, off; docs/method.md)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any step option, repeatable: kd_weight=1.25, lambda_o=0.5, pod_features=0.01, "
                   "head_init=random, ... (default: the method settings)")
    p.add_argument("--method-settings", metavar="FILE",
                   help="per-method settings (default: cimis/incremental/method_settings.json; cimis bench --tune "
                   "writes one)")
    p.add_argument("--iterations", type=_count(1), help="default: step 0's")
    p.add_argument("--batch-size", type=_count(1))
    p.add_argument("--lr", type=_positive_number, help="default: step 0's times the method's learning-rate factor (docs/method.md)")
    p.add_argument("--seed", type=_count(0))
    p.add_argument("--device", default="auto")
    p.add_argument("--val-every", type=_count(0), default=0)
    p.add_argument("--checkpoint-every", type=_count(0), default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--nproc", type=_count(1), help=NPROC_HELP)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("segment", help="segment volumes with a model; writes label maps on the input geometry")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--input", help="image file or DICOM folder")
    p.add_argument("--output", required=True, help="label map file (or folder with --manifest)")
    p.add_argument("--manifest", help="segment every case of a split instead of one --input")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dicom-seg", nargs="?", const="", metavar="PATH",
                   help="also write a DICOM SEG in the source's study (--input must be a DICOM series folder); "
                        "default PATH: beside --output, NAME.seg.dcm; needs pip install \"cimis[dicom]\"")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="Dice (and HD95) per class, as Markdown, CSV and JSON")
    p.add_argument("--manifest", help="reference labels come from this manifest's split")
    p.add_argument("--split", default="test")
    p.add_argument("--predictions", help="folder with CASE_ID.nii.gz label maps")
    p.add_argument("--pred", help="one predicted label map")
    p.add_argument("--ref", help="its reference label map")
    p.add_argument("--classes-from", help="model folder or manifest whose class list to use with --pred/--ref")
    p.add_argument("--hd95", action="store_true", help="also compute the 95th-percentile Hausdorff distance")
    p.add_argument("--out", default="evaluation", help="folder for evaluation.md/.csv/.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="phantoms -> base model -> incremental step (ft, pgcd-dapd) -> Dice tables (CPU, minutes)")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's output")
    p.add_argument("--segmentation-only", action="store_true",
                   help="stop after training on all 13 organs and segmenting the held-out phantom")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("story", help="the incremental story on real CT: how much of each old organ survives a "
                                     "step with ft and pgcd-dapd (shared/data/totalseg_example, or any labelled "
                                     "dataset across patients)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--totalseg", help="the totalseg_example folder (one CT: trained and scored on it)")
    source.add_argument("--manifest", help="a dataset's manifest (cimis manifest): trained on its 'train' split, "
                                           "scored on its 'test' split")
    p.add_argument("--old", type=_names, help="--manifest: step 0's organs (default: spleen, kidneys, liver, stomach)")
    p.add_argument("--new", type=_names, help="--manifest: the step's organs (default: aorta, inferior vena cava, "
                                              "gallbladder, pancreas)")
    p.add_argument("--spacing", type=_floats, help="--manifest: model spacing in mm (default 3,3,3)")
    p.add_argument("--out", default="real_ct_story")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier story's output")
    p.add_argument("--base-iterations", type=_count(1), help="step 0's budget (default 300)")
    p.add_argument("--step-iterations", type=_count(1), help="the incremental step's budget (default 200)")
    p.set_defaults(func=cmd_story)

    p = sub.add_parser("bench", help="benchmark incremental schedules: every method, per-class Dice after every step, "
                       "tables and plots (resumable)")
    from cimis.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("import-model", help="make a MONAI bundle or an nnU-Net v2 model a CIMISLearner model folder "
                       "(nothing from the source is executed)")
    p.add_argument("source", help="MONAI bundle folder (configs/, models/) or nnU-Net v2 trained-model folder "
                   "(plans.json, dataset.json, fold_N/)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--classes", type=_names, help="comma-separated class names to keep (default: all; the others "
                   "count as background); names the channels of a bundle whose metadata has none")
    p.add_argument("--fold", type=_count(0), help="nnU-Net: which fold's checkpoint (default: the first present)")
    p.add_argument("--volumes", nargs="+", metavar="CT", help="unlabelled CTs (files or DICOM folders) for the global "
                   "prototypes (default: the first learn step computes them from its own images)")
    p.add_argument("--spacing", type=_floats, help="model-space spacing in mm, where the bundle gives none literally")
    p.add_argument("--window", type=_window, help="CT window LOW,HIGH in HU, where the bundle gives none literally")
    p.add_argument("--intensity-range", type=_range, help="what --window maps onto (default 0,1)")
    p.add_argument("--patch-size", type=_ints, help="sliding-window size in voxels, where the bundle gives none literally")
    p.add_argument("--device", default="auto", help="for the prototypes of --volumes")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_model)

    p = sub.add_parser("export", help="write a model as a MONAI bundle that MONAI's bundle tools run without CIMISLearner")
    p.add_argument("model", help="model folder")
    p.add_argument("--format", choices=["monai-bundle"], default="monai-bundle")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("worker", help="run one job file (train, learn, segment, import); JSON events on stdout")
    p.add_argument("job", help="job file (docs/worker-protocol.md)")
    p.add_argument("--resume", action="store_true", help="continue a killed or cancelled job from its last checkpoint")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("models", help="the model registry: list, show, activate (rollback), delete, export, import")
    actions = p.add_subparsers(dest="action", required=True)
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--registry", default=os.environ.get("CIMIS_REGISTRY"), required=not os.environ.get("CIMIS_REGISTRY"),
                          help="registry folder (default: $CIMIS_REGISTRY)")
    a = actions.add_parser("list", parents=[registry], help="every version, * marks the active one")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("show", parents=[registry], help="one version (default: the active one), checksums verified")
    a.add_argument("version", nargs="?")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("activate", parents=[registry], help="make a version the active one (rollback)")
    a.add_argument("version")
    a = actions.add_parser("delete", parents=[registry], help="delete a version that is not active")
    a.add_argument("version")
    a = actions.add_parser("export", parents=[registry], help="write a version as a .tar.gz archive")
    a.add_argument("version")
    a.add_argument("--out", required=True, help="archive to write, e.g. liver-v3.tar.gz")
    a.add_argument("--overwrite", action="store_true")
    a = actions.add_parser("import", parents=[registry], help="add a version from an archive or a model folder")
    a.add_argument("source", help="a .tar.gz written by export, or a model folder")
    a.add_argument("--activate", action="store_true", help="make the imported version the active one")
    p.set_defaults(func=cmd_models)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {printable(str(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --nproc starts its ranks with the same
    warnings.showwarning = _one_line_warnings
    # Third-party chatter (MONAI deprecations, torch hints) is not for the user; ours goes through CimisError.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("monai").setLevel(logging.ERROR)
    try:
        args.func(args)
    except CimisError as exc:
        report_error(printable(exc.one_line()))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a user error wrapped by a library (e.g. raised inside a MONAI transform)
        cause = user_error_in(exc) or lost_peer(exc)
        if cause is None:
            raise
        report_error(printable(cause.one_line()))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
