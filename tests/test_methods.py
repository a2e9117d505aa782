"""The selection rules alone (the engine's use of them is in test_engine.py)."""

import math

import pytest

from genssd_cli.methods import METHODS


@pytest.mark.parametrize(
    ("ppls", "correct", "genssd", "posthoc"),
    [
        ([3.0, 2.0, 5.0], [True, False, True], 1, 0),  # the easiest is wrong: posthoc skips it
        ([3.0, 2.0, 5.0], [False, False, False], 1, 1),  # nothing right: the easiest, marked wrong
        ([2.0, 2.0, 1.5], [True, True, False], 2, 0),  # ties go to the first
        ([math.inf, 4.0], [True, True], 1, 1),  # a candidate with no tokens never wins
    ],
)
def test_selection_rules(ppls, correct, genssd, posthoc):
    assert METHODS["genssd"].select(ppls, correct) == genssd
    assert METHODS["posthoc-ppl"].select(ppls, correct) == posthoc
    assert METHODS["standard-kd"].candidates(8) == 1 and METHODS["posthoc-ppl"].candidates(8) == 8
