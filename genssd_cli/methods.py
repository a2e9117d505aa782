"""The selection policies, one engine: what the teacher is asked per request, and which candidate
is kept. Gen-SSD grows a trajectory chunk by chunk; the baselines ask for whole trajectories and
differ in how many and which survive. This module is the only place a candidate is chosen.

| method        | per request                        | kept                                              |
|---------------|------------------------------------|---------------------------------------------------|
| `genssd`      | n chunks continuing the prefix     | lowest student PPL per step, pruned if hard       |
| `standard-kd` | one whole trajectory               | it (train keeps it when correct)                  |
| `posthoc-ppl` | n whole trajectories               | the correct one with the lowest student PPL       |
| `morsd`       | n whole trajectories               | correct, not near-duplicate, lowest Rationale     |
|               |                                    | Difficulty first (`morsd.keep` of them)           |
| `random-pick` | n chunks continuing the prefix     | a seeded random one per step (control), pruned    |
|               |                                    | as genssd's                                       |
| `posthoc-random` | n whole trajectories            | a seeded random correct one (control)             |
| `standard-kd-budget` | n whole trajectories        | every correct one, a row each (Standard KD at    |
|               |                                    | genssd's teacher budget)                          |

MoRSD (Model-Oriented Rationale Selection Distillation, arXiv 2509.23574) is the paper's second
baseline. Only its abstract is reachable here: it keeps correct rationales, removes redundant
ones and keeps those of low Rationale Difficulty, "the ability of the student model to generate
the correct answer under a given rationale". Our reading, from a review of the full text:
RD = PPL_student(answer | question, rationale) / PPL_student(answer | question), lower kept.
How redundancy is measured (word n-gram Jaccard against the rationales already kept, lowest RD
first) and how many are kept per request (`morsd.keep`, default 1, as many rows as the other
methods write) are our choices. So are these, where the paper as we read it leaves them open:
- The answer sentence scored after the rationale is in the student prompt's own answer format
  (`answer_sentence`): `\boxed{X}` when the prompt asks for `\boxed{}`, `#### X` for `####`,
  else `The answer is X.` (our demo prompt's line, and our fallback).
- Dataset-level selection (`morsd.fraction` or `morsd.rows`, off by default): after every problem
  ended, the lowest-RD `fraction` of the rationales the per-request step kept (each correct and not
  a near-duplicate of a lower-RD one of its question; `morsd.keep` of them per request at most), or
  the `rows` lowest, across the whole dataset (`morsd_dataset_keep`). Only there can the
  denominator PPL(answer | question) change a pick: within one problem it divides every candidate
  alike. It runs where the finished rows are materialised (run/materialise.py), so
  trajectories.jsonl, and everything that reads it (train, export, report), holds the selection.

The last three are controls, ours (the paper has none of them), for telling what the student's
choice adds from what sampling n candidates adds:
- `random-pick` is genssd with the student's pick replaced by a seeded random one (the seed derived
  from `teacher.seed` and the step's key, so a rerun picks the same and the student has no say).
  The student still scores every candidate, so kept PPL and the selection diagnostics compare with
  genssd's; a step is re-sampled and pruned by genssd's rule, on the lowest PPL of the step (not on
  the picked one's), so only the pick differs between the two.
- `posthoc-random` is posthoc-ppl with a seeded random pick among the correct whole trajectories
  (among all when none is correct, kept marked incorrect); nothing is scored before the pick.
- `standard-kd-budget` spends what posthoc-ppl does (n whole trajectories per sample) and keeps every
  correct one as a training row (`rank` 0, 1, …; the first when none is correct, marked incorrect).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    whole: bool  # the teacher writes a whole trajectory in one request (else chunks)
    uses_n: bool  # asks search.n candidates per request (else one, and nothing to score)
    correct_first: bool  # only correct candidates compete, when there is one
    rationale_difficulty: bool = False  # MoRSD: chosen by `morsd_keep`, not by `select`
    random_pick: bool = False  # a control: a seeded random candidate, not the lowest PPL
    keep_all_correct: bool = False  # every correct candidate is a row (`keep`, not `select`)

    def candidates(self, n: int) -> int:
        return n if self.uses_n else 1

    @property
    def scores_candidates(self) -> bool:
        """Whether the student scores the n candidates before the pick (a chunked method always:
        its prune rule needs the PPLs)."""
        return self.uses_n and not (self.whole and (self.random_pick or self.keep_all_correct))

    def select(self, ppls: Sequence[float], correct: Sequence[bool] = (), seed: int | None = None) -> int:
        """The kept candidate's index: the lowest PPL (first on ties), among the correct ones for
        a method that filters on correctness. With no correct candidate the easiest is kept
        anyway, marked incorrect, so the record is complete (train leaves it out). A random-pick
        control draws with `seed` from the same pool instead."""
        pool = range(len(ppls))
        if self.correct_first and any(correct):
            pool = [i for i in pool if correct[i]]
        if self.random_pick:
            if seed is None:
                raise ValueError(f"{self.name} picks at random: it needs the step's seed")
            return random_index(seed, pool)
        return lowest_index(ppls, pool)

    def keep(self, correct: Sequence[bool]) -> list[int]:
        """`standard-kd-budget`'s rows: every correct candidate in index order, else the first."""
        return [i for i, ok in enumerate(correct) if ok] or [0]


def lowest_index(ppls: Sequence[float], pool: Sequence[int] | None = None) -> int:
    """The candidate the student finds easiest (first one on ties)."""
    return min(range(len(ppls)) if pool is None else pool, key=lambda i: ppls[i])


def random_index(seed: int, pool: Sequence[int]) -> int:
    """A seeded uniform pick from `pool`: the same seed and pool always give the same index."""
    pool = list(pool)
    return pool[random.Random(seed).randrange(len(pool))]


def morsd_keep(
    rd: Sequence[float | None], rationales: Sequence[str], keep: int, threshold: float, ngram: int
) -> list[int]:
    """MoRSD's pick, best first: the candidates with a Rationale Difficulty (the correct ones),
    lowest RD first (first index on ties); one whose rationale's word n-grams overlap an already
    kept one's by `threshold` or more (Jaccard) is redundant and dropped; at most `keep`. Empty
    when no candidate is correct (the engine then keeps the first, marked incorrect)."""
    order = sorted((i for i, v in enumerate(rd) if v is not None and math.isfinite(v)), key=lambda i: (rd[i], i))
    kept: list[int] = []
    grams = {i: word_ngrams(rationales[i], ngram) for i in order}
    for i in order:
        if len(kept) == keep:
            break
        if all(jaccard(grams[i], grams[k]) < threshold for k in kept):
            kept.append(i)
    return kept


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def answer_sentence(student_template: str, reference: str) -> str:
    """MoRSD's answer after a rationale, in the answer format the student's prompt asks for (ours):
    `\\boxed{X}`, `#### X`, else `The answer is X.`."""
    if "\\boxed" in student_template:
        return f"\\boxed{{{reference}}}"
    if "####" in student_template:
        return f"#### {reference}"
    return f"The answer is {reference}."


def morsd_dataset_keep(ranked: Sequence[tuple[object, float]], fraction: float | None, rows: int | None) -> set:
    """MoRSD's dataset-level selection (ours, see above): of the (key, RD) of every row the
    per-request step kept (correct ones only), the keys of the lowest-RD `fraction` of them
    (rounded, at least one) or of the `rows` lowest; ties go to the earlier in the given order."""
    order = sorted(range(len(ranked)), key=lambda i: (ranked[i][1], i))
    count = len(order) if fraction is None else max(1, round(fraction * len(order))) if order else 0
    if rows is not None:
        count = min(count, rows)
    return {ranked[i][0] for i in order[:count]}


METHODS: dict[str, Method] = {
    "genssd": Method("genssd", whole=False, uses_n=True, correct_first=False),
    "standard-kd": Method("standard-kd", whole=True, uses_n=False, correct_first=False),
    "posthoc-ppl": Method("posthoc-ppl", whole=True, uses_n=True, correct_first=True),
    "morsd": Method("morsd", whole=True, uses_n=True, correct_first=True, rationale_difficulty=True),
    "random-pick": Method("random-pick", whole=False, uses_n=True, correct_first=False, random_pick=True),
    "posthoc-random": Method("posthoc-random", whole=True, uses_n=True, correct_first=True, random_pick=True),
    "standard-kd-budget": Method("standard-kd-budget", whole=True, uses_n=True, correct_first=True,
                                 keep_all_correct=True),
}
