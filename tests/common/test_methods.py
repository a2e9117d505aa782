"""The methods' selection rules alone (genssd_cli/methods.py), in process on literal PPLs and
correctness: which candidate genssd, posthoc-ppl and standard-kd keep, ties and empty candidates, and
MoRSD's keep-lowest-difficulty with near-duplicates dropped. The engine's use of them is in tests/run/."""

import math

import pytest

from genssd_cli.methods import METHODS, morsd_keep


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


def test_morsd_keeps_the_lowest_difficulty_and_drops_near_duplicates():
    texts = ["a b c d e f", "a b c d e g", "p q r s t u", "x y z w v u"]
    rd = [0.5, 0.4, 0.9, None]  # the last is not correct
    # 1 and 0 share 3 of 5 word trigrams (Jaccard 0.6): one repeats the other at threshold 0.5.
    assert morsd_keep(rd, texts, keep=3, threshold=0.5, ngram=3) == [1, 2]
    assert morsd_keep(rd, texts, keep=3, threshold=0.8, ngram=3) == [1, 0, 2]
    assert morsd_keep(rd, texts, keep=1, threshold=0.8, ngram=3) == [1]
    assert morsd_keep([None, None], texts[:2], keep=2, threshold=0.8, ngram=3) == []
    assert morsd_keep([0.7, 0.7], texts[:2], keep=1, threshold=0.8, ngram=3) == [0]  # ties: the first
