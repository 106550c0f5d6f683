"""``cimis bench``: its options, and the command that runs the benchmarks they describe and writes the reports.

Options start from a preset (``--quick``, ``--full``, or the plain defaults of :class:`BenchConfig`) and every
option given on the command line overrides the preset's value. This module imports the engine lazily, so
building the ``cimis`` parser stays cheap.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from cimis.arguments import floats, ints  # the same number parsing as the other subcommands
from cimis.errors import CimisError


def _seed_list(text: str) -> list[int]:
    """``N`` (a count: seeds 0 .. N-1) or a comma-separated list of seeds (``0,1,2``; ``5,`` is seed 5 alone)."""
    try:
        if "," not in text:
            return list(range(int(text)))  # 0 seeds: BenchConfig refuses it in one error line
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seeds (3) or a list like 0,1,2, got {text!r}") from None


def _factors(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,0.3, got {text!r}") from None


def _shard(text: str) -> tuple[int, int]:
    from cimis.bench.shard import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="phantoms on the CPU: BTCV 7-3, all methods, one seed (about 30 minutes on 2 cores)")
    mode.add_argument("--full", action="store_true",
                      help="real CT on a GPU: METHOD.md's schedules on --btcv and/or --word, three seeds")
    p.add_argument("--out", required=True, help="output folder; run the same command again to resume")
    p.add_argument("--dataset", help="phantoms (default), btcv, word (with --data-root), or a manifest JSON")
    p.add_argument("--data-root", help="the BTCV or WORD folder for --dataset btcv/word")
    p.add_argument("--btcv", help="--full: the BTCV folder")
    p.add_argument("--word", help="--full: the WORD folder")
    p.add_argument("--schedule", help="N-M (e.g. 7-3) or explicit groups like spleen,liver/aorta/6,7")
    p.add_argument("--order", help="class order for N-M: dataset (default), seed:K (a seeded permutation), or names")
    p.add_argument("--methods", help="comma-separated (default: joint,ft,lwf,ilt,mib,plop,pgcd-dapd); "
                   "STRATEGY-no-SWITCH turns an ablation switch off")
    p.add_argument("--ablation", action="store_true",
                   help="pgcd-dapd with each switch of METHOD.md section 7 off in turn; writes ablation.md "
                   "(--quick: schedule 7-6; --full: BTCV 7-3, WORD 8-4)")
    p.add_argument("--seeds", type=_seed_list,
                   help="N runs every unit with seeds 0..N-1; or a list, e.g. 0,1,2 (5, for seed 5 alone)")
    p.add_argument("--method-settings", metavar="FILE",
                   help="per-method settings (default: cimis/incremental/method_settings.json); e.g. the "
                   "tuned_settings.json that --tune writes")
    p.add_argument("--tune", action="store_true",
                   help="tune every method on the validation split (same grid and budget for all) and write "
                   "tuned_settings.json and tune.md; the test split is not touched")
    p.add_argument("--tune-lr-factors", type=_factors, help="tuning grid: step learning-rate factors (default 1,0.3)")
    p.add_argument("--tune-head-inits", type=_words, help="tuning grid: head inits (default random,balanced)")
    p.add_argument("--tune-weight-factors", type=_factors,
                   help="tuning grid: factors of each method's main weight (default 0.1,1,10)")
    p.add_argument("--base-iterations", type=int, help="step 0's (and joint's) training iterations")
    p.add_argument("--base-lr", type=float)
    p.add_argument("--step-iterations", type=int, help="iterations of every later step (default: step 0's)")
    p.add_argument("--step-lr", type=float, help="default: cimis learn's (step 0's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--network", choices=["small", "dynunet"])
    p.add_argument("--spacing", type=floats, help="model-space spacing in mm")
    p.add_argument("--patch", type=ints, help="patch size in voxels")
    p.add_argument("--phantom-variant", choices=["btcv", "word"], help="phantoms with the 13 BTCV or 16 WORD organs")
    p.add_argument("--phantom-cases", type=int, help="phantoms to generate (train + val + test)")
    p.add_argument("--phantom-spacing", type=float, help="phantom voxel size in mm")
    p.add_argument("--phantom-val-cases", type=int,
                   help="validation cases among --phantom-cases (--quick: 1); --tune chooses on them")
    p.add_argument("--phantom-test-cases", type=int)
    p.add_argument("--phantom-step-scanner", choices=["reference", "other"],
                   help="hard setting: the steps' volumes come from this scanner, step 0's from the reference "
                   "one (cimis/data/phantom.py: Scanner)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads")
    p.add_argument("--no-predictions", action="store_true", help="do not keep the test predictions")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the stored results")
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="run only shard I of N (0 <= I < N): every N-th (seed, method) chain, in OUT/shards/I-of-N "
                   "(docs/bench.md: a SLURM array)")
    p.add_argument("--merge", nargs="*", metavar="DIR",
                   help="write the report in OUT from the results of the shard folders DIR... (default: "
                   "every OUT/shards/I-of-N)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def bench_command(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise CimisError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.merge is not None:
        if args.shard or args.tune or args.report_only:
            raise CimisError("--merge only writes the report from finished shards",
                             "leave out --shard, --tune and --report-only")
        merge_and_report(Path(args.out), [Path(d) for d in args.merge], args.ablation)
        return
    if args.shard and (args.tune or args.report_only):
        raise CimisError("--shard runs a part of a benchmark", "leave out --tune and --report-only")
    for out, config in configs_from(args):
        if args.shard:
            run_shard(out, config, *args.shard, progress=not args.quiet)
        elif args.tune:
            tune_and_report(out, config, tune_grid(args), progress=not args.quiet)
        else:
            run_and_report(out, config, args.ablation, args.report_only, progress=not args.quiet)


def tune_grid(args: argparse.Namespace):
    from cimis.bench.tune import TuneGrid

    if args.report_only:
        raise CimisError("--tune and --report-only do not go together", "leave one out")
    grid = {k: v for k, v in {"learning_rate_factors": args.tune_lr_factors, "head_inits": args.tune_head_inits,
                              "weight_factors": args.tune_weight_factors}.items() if v is not None}
    return TuneGrid(**grid)


def tune_and_report(out: Path, config, grid, progress: bool = True) -> dict[str, Path]:
    """Tune every method of one benchmark on its validation split; print the chosen candidates."""
    from cimis.bench.runner import prepare
    from cimis.bench.tune import run_tuning

    bench = prepare(config, out, progress)
    print(f"tuning in {out}: {bench.manifest.name}, step 1 of schedule {config.schedule}, "
          f"{len(bench.methods)} method(s), on the validation split")
    paths = run_tuning(bench, grid, progress)
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return paths


def configs_from(args: argparse.Namespace) -> list[tuple[Path, "BenchConfig"]]:  # noqa: F821
    """The benchmarks the options ask for, each with its output folder."""
    from cimis.bench.config import BenchConfig, PhantomData
    from cimis.bench.methods import ablation_methods
    from cimis.bench.presets import ABLATION_SCHEDULE, SCHEDULES, full_config, quick_config

    out = Path(args.out)
    if args.ablation and args.methods:
        raise CimisError("--ablation chooses the methods itself", "leave out --methods, or leave out --ablation")
    methods = ablation_methods() if args.ablation else (args.methods.split(",") if args.methods else None)
    if args.full:
        roots = {"btcv": args.btcv, "word": args.word}
        if args.dataset in ("btcv", "word") and args.data_root:
            roots[args.dataset] = args.data_root
        roots = {k: v for k, v in roots.items() if v}
        if not roots:
            raise CimisError("--full runs on real CT", "give --btcv DIR and/or --word DIR")
        if args.device is None and not torch_cuda_available():
            raise CimisError("--full is sized for a GPU and none is available",
                             "run --quick, or pass --device cpu to run it on the CPU anyway")
        planned = []
        for dataset, root in roots.items():
            schedules = [args.schedule] if args.schedule else (
                [ABLATION_SCHEDULE[dataset]] if args.ablation else list(SCHEDULES[dataset]))
            planned += [(out / f"{dataset}-{s.replace('/', '_')}", full_config(dataset, root, s, methods))
                        for s in schedules]
    else:
        if args.quick:
            base = quick_config(methods, ablation=args.ablation)
        else:
            base = BenchConfig(methods=methods) if methods else BenchConfig()
        planned = [(out, base)]

    result = []
    for folder, config in planned:
        overrides = {k: v for k, v in {
            "schedule": args.schedule, "order": args.order, "seeds": args.seeds,
            "base_iterations": args.base_iterations, "base_lr": args.base_lr,
            "step_iterations": args.step_iterations, "step_lr": args.step_lr, "batch_size": args.batch_size,
            "network": args.network, "spacing": args.spacing, "patch": args.patch, "device": args.device,
            "method_settings": args.method_settings,
        }.items() if v is not None}
        if not args.full and args.dataset:
            overrides["dataset"] = args.dataset
            overrides["data_root"] = args.data_root
        if args.no_predictions:
            overrides["save_predictions"] = False
        phantom = {k: v for k, v in {"variant": args.phantom_variant, "cases": args.phantom_cases,
                                       "spacing": args.phantom_spacing, "val_cases": args.phantom_val_cases,
                                       "test_cases": args.phantom_test_cases}.items() if v is not None}
        if args.phantom_step_scanner is not None:
            phantom["step_scanner"] = None if args.phantom_step_scanner == "reference" else args.phantom_step_scanner
        if phantom:
            overrides["phantoms"] = PhantomData(**{**vars(config.phantoms), **phantom})
        result.append((folder, replace(config, **overrides)))
    return result


def run_shard(out: Path, config, index: int, count: int, progress: bool = True) -> None:
    """Run shard ``index`` of ``count`` of one benchmark in ``out/shards/I-of-N`` (cimis/bench/shard.py)."""
    from cimis.bench.runner import prepare, run_bench
    from cimis.bench.shard import shard_folder, shard_units

    folder = shard_folder(out, index, count)
    if not (out / "shards").is_dir():
        from cimis.bench.config import check_output_folder

        check_output_folder(out)  # a folder of something else is refused before anything is written into it
    bench = prepare(config, folder, progress)
    units = shard_units(bench.units(), index, count)
    print(f"benchmark shard {index}/{count} in {folder}: {len(units)} of {len(bench.units())} units")
    counts = run_bench(bench, progress, units)
    print(f"{counts['finished before']} unit(s) finished before, {counts['computed']} computed now; "
          f"when every shard is done: cimis bench --out {out} --merge")


def merge_and_report(out: Path, folders: list[Path], ablation: bool) -> dict[str, Path]:
    """``--merge``: the report of the shards in ``folders`` (default: ``out/shards/*``), written in ``out``."""
    from cimis.bench.methods import parse_methods
    from cimis.bench.results import BASE, Unit
    from cimis.bench.schedule import Schedule
    from cimis.bench.shard import merge_shards, shard_folders

    stored = merge_shards(out, folders or shard_folders(out))
    schedule = Schedule(tuple(tuple(step) for step in stored["schedule_steps"]))
    methods = [m.name for m in parse_methods(stored["methods"])]
    seeds = list(stored["seeds"])
    units = [u for s in seeds for u in [Unit(BASE, 0, s)] + [Unit(m, t, s) for t in range(1, len(schedule.steps))
                                                            for m in methods]]
    print(f"benchmark merged in {out}: {len(folders or shard_folders(out))} shard(s)")
    return write_report(out, schedule, methods, seeds, units, stored, ablation)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_and_report(out: Path, config, ablation: bool, report_only: bool, progress: bool = True) -> dict[str, Path]:
    """Run (or, with ``report_only``, only report) one benchmark; print its summary; return the files written."""
    from cimis.bench.config import CONFIG_NAME
    from cimis.bench.runner import prepare, run_bench

    if report_only and not (out / CONFIG_NAME).is_file():
        raise CimisError(f"{out} holds no benchmark to report on", "run cimis bench without --report-only first")
    bench = prepare(config, out, progress)
    units = bench.units()
    print(f"benchmark in {out}: {bench.manifest.name}, schedule {config.schedule} "
          f"({bench.schedule.describe()} classes), {len(bench.methods)} method(s), seeds {config.seeds}, "
          f"{len(units)} units on {bench.device.type}")
    if not report_only:
        counts = run_bench(bench, progress)
        print(f"{counts['finished before']} unit(s) finished before, {counts['computed']} computed now")
    return write_report(out, bench.schedule, [m.name for m in bench.methods], list(config.seeds), units,
                        bench.stored, ablation)


def write_report(out: Path, schedule, methods: list[str], seeds: list[int], units, stored: dict,
                 ablation: bool) -> dict[str, Path]:
    """The report, plots (and ablation table) in ``out`` from the results stored there; prints its summary."""
    from cimis.bench.ablation import write_ablation
    from cimis.bench.plots import write_plots
    from cimis.bench.report import BenchReport
    from cimis.bench.results import load_results

    report = BenchReport(schedule, methods, seeds, load_results(out, units), stored)
    paths = report.write(out)
    paths.update(write_plots(report, out))
    if ablation:
        paths.update(write_ablation(report, out))
    print(report.terminal_summary())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return paths
