"""Schedules in "N-M" notation and as explicit groupings, and the class order they walk through."""

from __future__ import annotations

import numpy as np
import pytest

from cimis.bench.schedule import class_order, parse_schedule
from cimis.data.classes import BTCV_ORGANS, btcv_classes, word_classes
from cimis.errors import CimisError

BTCV = btcv_classes()


def test_btcv_7_3_in_label_order():
    schedule = parse_schedule("7-3", BTCV)
    assert [len(s) for s in schedule.steps] == [7, 3, 3]
    assert schedule.step0 == BTCV_ORGANS[:7]
    assert schedule.steps[1] == ("aorta", "inferior vena cava", "portal vein and splenic vein")
    assert schedule.steps[2] == ("pancreas", "right adrenal gland", "left adrenal gland")
    assert schedule.later == BTCV_ORGANS[7:]
    assert schedule.known_after(1) == BTCV_ORGANS[:10]
    assert schedule.step_of("pancreas") == 2 and schedule.step_of("spleen") == 0


@pytest.mark.parametrize("text, sizes", [
    ("7-6", [7, 6]), ("7-2", [7, 2, 2, 2]), ("7-4", [7, 4, 2]), ("9-1", [9, 1, 1, 1, 1]), ("4-3", [4, 3, 3, 3]), (" 12 - 5 ", [12, 1]),
])
def test_btcv_schedules_of_method_md(text, sizes):
    schedule = parse_schedule(text, BTCV)
    assert [len(s) for s in schedule.steps] == sizes
    assert [c for s in schedule.steps for c in s] == list(BTCV_ORGANS)


def test_word_8_4():
    schedule = parse_schedule("8-4", word_classes())
    assert [len(s) for s in schedule.steps] == [8, 4, 4]
    assert schedule.steps[2][-1] == "head of right femur"


def test_explicit_grouping_by_name_and_value_keeps_the_written_order():
    schedule = parse_schedule("Liver, 1 / aorta / 13,12", BTCV)
    assert schedule.steps == (("liver", "spleen"), ("aorta",), ("left adrenal gland", "right adrenal gland"))


def test_seeded_order_is_a_reproducible_permutation():
    first, again, other = class_order(BTCV, "seed:3"), class_order(BTCV, "seed:3"), class_order(BTCV, "seed:4")
    assert first == again and sorted(first) == sorted(BTCV.names)
    assert first != list(BTCV.names) and first != other
    expected = [BTCV.names[i] for i in np.random.default_rng(3).permutation(13)]
    assert first == expected
    schedule = parse_schedule("7-3", BTCV, "seed:3")
    assert schedule.step0 == tuple(first[:7])


def test_explicit_order():
    order = ",".join(reversed(BTCV_ORGANS))
    assert parse_schedule("10-3", BTCV, order).step0 == tuple(reversed(BTCV_ORGANS))[:10]


@pytest.mark.parametrize("text, order, words", [
    ("13-1", "dataset", "leaving none"),
    ("0-3", "dataset", "at least one"),
    ("7-0", "dataset", "at least one"),
    ("spleen,kidney/liver", "dataset", "unknown class 'kidney'"),
    ("spleen,liver/liver", "dataset", "twice"),
    ("spleen,liver", "dataset", "single step"),
    ("spleen/liver", "seed:1", "already fixes the class order"),
    ("7-3", "spleen,liver", "leaves out"),
    ("7-3", "spleen,spleen", "listed twice"),
    ("", "dataset", "empty"),
])
def test_bad_schedules_are_refused_with_a_reason(text, order, words):
    with pytest.raises(CimisError, match=words):
        parse_schedule(text, BTCV, order)
