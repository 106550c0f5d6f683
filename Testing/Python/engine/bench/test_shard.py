"""``cimis bench --shard I/N`` and ``--merge``: two shards merged give the report of one unsharded run.

The configuration is test_bench_cli.py's, shortened to one incremental step: a base model on four organs,
then two organs with ft and pgcd-dapd, one seed. Two chains (seed 0 with ft, seed 0 with pgcd-dapd): shard
0 of 2 runs the first, shard 1 the second, each with its own copy of the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cimis.bench.results import BASE, Unit
from cimis.bench.shard import shard_units
from cimis.cli import main

ARGS = ["bench", "--dataset", "phantoms", "--phantom-cases", "4", "--phantom-spacing", "8",
        "--phantom-test-cases", "1", "--schedule", "spleen,liver,aorta,left kidney/right kidney,stomach",
        "--methods", "ft,pgcd-dapd", "--seeds", "1", "--network", "small", "--spacing", "8", "--patch", "32,32,16",
        "--base-iterations", "2", "--step-iterations", "2", "--device", "cpu", "--threads", "1", "--quiet"]


def _results(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder / "results")) for p in (folder / "results").rglob("*.json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    whole, sharded = root / "whole", root / "sharded"
    codes = [main([*ARGS, "--out", str(whole)])]
    codes += [main([*ARGS, "--out", str(sharded), "--shard", shard]) for shard in ("0/2", "1/2")]
    shards = {s: _results(sharded / "shards" / s) for s in ("0-of-2", "1-of-2")}
    codes.append(main(["bench", "--out", str(sharded), "--merge", "--quiet"]))
    return codes, whole, sharded, shards


def test_each_shard_runs_its_chain_with_the_base_model(runs):
    codes, _, _, shards = runs
    assert codes == [0, 0, 0, 0]
    assert shards == {"0-of-2": ["seed0/base/step0.json", "seed0/ft/step1.json"],
                      "1-of-2": ["seed0/base/step0.json", "seed0/pgcd-dapd/step1.json"]}


def test_merged_shards_give_the_rows_of_an_unsharded_run(runs):
    _, whole, sharded, _ = runs
    one, merged = (json.loads((f / "report.json").read_text()) for f in (whole, sharded))
    assert merged["missing_units"] == [] and merged["units"] == one["units"]
    assert merged["schedule"] == one["schedule"] and merged["methods"] == one["methods"]
    # The same training on the CPU (one thread, same seeds) in another folder: the same Dice, row by row.
    assert merged["per_class"] == one["per_class"]
    assert merged["summary"] == one["summary"]
    assert (sharded / "report.md").is_file()
    # A merged result names the model where its shard wrote it.
    ft = json.loads((sharded / "results" / "seed0" / "ft" / "step1.json").read_text())
    assert (sharded / ft["model"] / "card.json").is_file()


def test_chains_split_in_a_stable_order_with_their_base_models():
    units = [Unit(BASE, 0, 0), *(Unit(m, t, s) for s in (0,) for t in (1, 2) for m in ("ft", "mib", "plop")),
             Unit(BASE, 0, 5), *(Unit(m, t, 5) for t in (1, 2) for m in ("ft", "mib", "plop"))]
    parts = [shard_units(units, i, 4) for i in range(4)]
    chains = [sorted({(u.seed, u.method) for u in part if u.method != BASE}) for part in parts]
    assert chains == [[(0, "ft"), (5, "mib")], [(0, "mib"), (5, "plop")], [(0, "plop")], [(5, "ft")]]
    for part in parts:  # steps in order, each chain's base model first
        assert part == [u for u in units if u in part]
        assert {u.seed for u in part if u.method == BASE} == {u.seed for u in part}
    assert sorted(u.key for p in parts for u in p if u.method != BASE) == sorted(u.key for u in units if u.method != BASE)
    assert shard_units(units, 0, 20) == units[:1] + [u for u in units if (u.seed, u.method) == (0, "ft")]


@pytest.mark.parametrize("value", ["2/2", "1/0", "-1/2", "x", "1/2/3", ""])
def test_a_bad_shard_is_one_error_line(tmp_path, capsys, value):
    assert _exit_code(["bench", "--out", str(tmp_path / "o"), f"--shard={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "I/N" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_merging_nothing_is_one_error_line(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no shard to merge") and err.count("\n") == 1


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refuses it before main's handler
        return exc.code
