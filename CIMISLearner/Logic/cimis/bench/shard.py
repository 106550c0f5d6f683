"""Sharding a benchmark over machines (a SLURM array, several hosts) and merging the shards' results.

The work is cut into *chains*: one (seed, method) pair through every step of the schedule, since each step
starts from the same method's model of the step before. Chains are numbered in a stable order (seeds in
the order given, then methods in the order given) and shard ``I`` of ``N`` runs chains ``I, I + N, ...``.

Each shard works in its own folder, ``OUT/shards/I-of-N`` (a complete benchmark folder: bench.json, data,
runs, results), so shards never write the same file, on one shared filesystem or on several machines.
A chain needs its seed's base model: a shard trains the base models of the seeds its chains use (the same
deterministic training in every shard that needs it; the duplicated cost is one step-0 training per seed
and shard). ``cimis bench --merge`` copies every shard's results into ``OUT/results`` (a unit present in
several shards, a base model, is taken from the first) and writes the usual report from them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cimis.bench.config import CONFIG_NAME, claim_output_folder, write_json_atomic
from cimis.bench.results import BASE, Unit, read_result
from cimis.errors import CimisError

SHARDS = "shards"
_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with ``0 <= I < N`` -> ``(I, N)``."""
    match = _SHARD.match(text.strip())
    if match:
        index, count = int(match.group(1)), int(match.group(2))
        if 0 <= index < count:
            return index, count
    raise ValueError(f"expected I/N with 0 <= I < N, like 0/4 (the first of four shards), got {text!r}")


def shard_folder(out: Path, index: int, count: int) -> Path:
    return Path(out) / SHARDS / f"{index}-of-{count}"


def shard_units(units: list[Unit], index: int, count: int) -> list[Unit]:
    """Shard ``index``'s part of ``units`` (a benchmark's units in running order): its chains, every
    ``count``-th from the ``index``-th, preceded by the base models of their seeds."""
    chains: list[tuple[int, str]] = []
    for u in units:
        if u.method != BASE and (u.seed, u.method) not in chains:
            chains.append((u.seed, u.method))
    mine = set(chains[index::count])
    seeds = {seed for seed, _ in mine}
    return [u for u in units if (u.method == BASE and u.seed in seeds) or (u.seed, u.method) in mine]


def shard_folders(out: Path) -> list[Path]:
    """The shard folders under ``out/shards``, in shard order."""
    def order(p: Path):
        first, _, count = p.name.partition("-of-")
        return (int(count), int(first)) if first.isdigit() and count.isdigit() else (0, 0)

    root = Path(out) / SHARDS
    return sorted((p for p in root.glob("*-of-*") if p.is_dir() and order(p) != (0, 0)), key=order) \
        if root.is_dir() else []


def merge_shards(out: Path, folders: list[Path]) -> dict:
    """Copy the results of the benchmark shards in ``folders`` into ``out`` (which gets their bench.json);
    returns the stored configuration. Refuses folders of different benchmarks, and never replaces a result
    ``out`` already holds."""
    out = Path(out)
    if not folders:
        raise CimisError(f"no shard to merge in {out / SHARDS}",
                         "run cimis bench --shard I/N first, or name the shard folders after --merge")
    stored, first = None, None
    for folder in folders:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CimisError(f"{folder} holds no benchmark shard ({CONFIG_NAME} is missing)",
                             "name folders written by cimis bench --shard")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CimisError(f"cannot read {path}: {exc}") from None
        if stored is None:
            stored, first = config, folder
        elif config.get("identity") != stored.get("identity") or config.get("methods") != stored.get("methods") \
                or config.get("seeds") != stored.get("seeds"):
            raise CimisError(f"{folder} and {first} hold different benchmarks", "merge the shards of one benchmark")
    claim_output_folder(out, stored)
    for folder in folders:
        results = Path(folder) / "results"
        for source in sorted(results.rglob("*.json")) if results.is_dir() else []:
            target = out / "results" / source.relative_to(results)
            if target.exists():
                continue  # results are never rewritten; a base model's comes from the first shard
            result = read_result(source)
            for key in ("model", "predictions"):  # paths relative to the shard: now relative to out
                if result.get(key):
                    result[key] = os.path.relpath(Path(folder).resolve() / result[key], out.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(target, result)
    return stored
