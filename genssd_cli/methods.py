"""The selection policies, one engine: what the teacher is asked per request, and which candidate
is kept. Gen-SSD grows a trajectory chunk by chunk; the two baselines ask for whole trajectories
and differ only in how many and which one survives.

| method        | per request                        | kept                                         |
|---------------|------------------------------------|----------------------------------------------|
| `genssd`      | n chunks continuing the prefix     | lowest student PPL per step, pruned if hard  |
| `standard-kd` | one whole trajectory               | it (train keeps it when correct)             |
| `posthoc-ppl` | n whole trajectories               | the correct one with the lowest student PPL  |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    whole: bool  # the teacher writes a whole trajectory in one request (else chunks)
    uses_n: bool  # asks search.n candidates per request (else one, and nothing to score)
    correct_first: bool  # only correct candidates compete, when there is one

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


METHODS: dict[str, Method] = {
    "genssd": Method("genssd", whole=False, uses_n=True, correct_first=False),
    "standard-kd": Method("standard-kd", whole=True, uses_n=False, correct_first=False),
    "posthoc-ppl": Method("posthoc-ppl", whole=True, uses_n=True, correct_first=True),
}
