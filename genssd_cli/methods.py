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

MoRSD (Model-Oriented Rationale Selection Distillation, arXiv 2509.23574) is the paper's second
baseline. Only its abstract is reachable here: it keeps correct rationales, removes redundant
ones and keeps those of low Rationale Difficulty, "the ability of the student model to generate
the correct answer under a given rationale". Our reading, from a review of the full text:
RD = PPL_student(answer | question, rationale) / PPL_student(answer | question), lower kept.
How redundancy is measured (word n-gram Jaccard against the rationales already kept, lowest RD
first) and how many are kept per request (`morsd.keep`, default 1, as many rows as the other
methods write) are our choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    whole: bool  # the teacher writes a whole trajectory in one request (else chunks)
    uses_n: bool  # asks search.n candidates per request (else one, and nothing to score)
    correct_first: bool  # only correct candidates compete, when there is one
    rationale_difficulty: bool = False  # MoRSD: chosen by `morsd_keep`, not by `select`

    def candidates(self, n: int) -> int:
        return n if self.uses_n else 1

    def select(self, ppls: Sequence[float], correct: Sequence[bool] = ()) -> int:
        """The kept candidate's index: the lowest PPL (first on ties), among the correct ones for
        a method that filters on correctness. With no correct candidate the easiest is kept
        anyway, marked incorrect, so the record is complete (train leaves it out)."""
        pool = range(len(ppls))
        if self.correct_first and any(correct):
            pool = [i for i in pool if correct[i]]
        return lowest_index(ppls, pool)


def lowest_index(ppls: Sequence[float], pool: Sequence[int] | None = None) -> int:
    """The candidate the student finds easiest (first one on ties)."""
    return min(range(len(ppls)) if pool is None else pool, key=lambda i: ppls[i])


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


METHODS: dict[str, Method] = {
    "genssd": Method("genssd", whole=False, uses_n=True, correct_first=False),
    "standard-kd": Method("standard-kd", whole=True, uses_n=False, correct_first=False),
    "posthoc-ppl": Method("posthoc-ppl", whole=True, uses_n=True, correct_first=True),
    "morsd": Method("morsd", whole=True, uses_n=True, correct_first=True, rationale_difficulty=True),
}
