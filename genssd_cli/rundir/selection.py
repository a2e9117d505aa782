"""How the student's choice went, over a whole run (summary.json's `selection`): running sums taken
one choice at a time during the log's one pass (replay.py's `RunLog`), then the shares against
their base rates."""

from __future__ import annotations

from dataclasses import dataclass, field

from genssd_cli.rundir.records import Candidate, Choice, Finish, Prune, Response, SelectionStats


@dataclass(slots=True)
class SelectionTally:
    """Running sums behind `SelectionStats`, one selection (a choice of n >= 2 candidates) at a
    time, and the per-trajectory teacher tokens of the trajectories still open (memory grows with
    those, as the replay's does, and with the problems that have a correct row)."""

    selections: int = 0
    distinct: int = 0
    with_distinct: int = 0
    differs_from_first: int = 0
    differs_from_random: float = 0.0
    kept_shortest: int = 0
    shortest_base: float = 0.0
    kept_stopping: int = 0
    stopping_base: float = 0.0
    steps: int = 0  # choices of attempt 0
    resamples: int = 0  # choices of attempt > 0
    ended: int = 0  # trajectories finished, truncated or pruned
    pruned: int = 0
    pruned_tokens: int = 0
    open_tokens: dict[tuple[str, int], int] = field(default_factory=dict)  # by (problem_id, sample)
    covered: set[str] = field(default_factory=set)  # problems with a correct row

    def choice(self, choice: Choice, responses: list[Response]) -> None:
        if choice.attempt:
            self.resamples += 1
        else:
            self.steps += 1
        by_index: dict[int, Candidate] = {}
        for response in responses:  # in arrival order, as the engine absorbed them
            for offset, candidate in enumerate(response.candidates):
                by_index[response.start + offset] = candidate
        n = len(choice.ppl)
        if n < 2 or any(i not in by_index for i in range(n)):
            return
        candidates = [by_index[i] for i in range(n)]
        kept = candidates[choice.chosen]
        texts = [c.text for c in candidates]
        fewest = min(c.tokens for c in candidates)
        stopping = [c.finish_reason == "stop" for c in candidates]
        self.selections += 1
        self.distinct += len(set(texts))
        self.with_distinct += len(set(texts)) > 1
        self.differs_from_first += kept.text != texts[0]
        self.differs_from_random += 1 - texts.count(kept.text) / n
        self.kept_shortest += kept.tokens == fewest
        self.shortest_base += sum(c.tokens == fewest for c in candidates) / n
        self.kept_stopping += stopping[choice.chosen]
        self.stopping_base += sum(stopping) / n

    def response(self, key: tuple[str, int], tokens: int) -> None:
        self.open_tokens[key] = self.open_tokens.get(key, 0) + tokens

    def end(self, event: Finish | Prune) -> None:
        tokens = self.open_tokens.pop((event.problem_id, event.sample), 0)
        self.ended += 1
        if isinstance(event, Prune):
            self.pruned += 1
            self.pruned_tokens += tokens
        else:
            self.covered.update(r.problem_id for r in (event.row, *event.more) if r.correct)

    def stats(self, problems: int, ids: set[str] | None, completion_tokens: int, correct: int) -> SelectionStats:
        """Over `problems` problems; `ids`, when known, limits coverage to the run's own (a row of a
        problem no longer in the run's list does not count)."""

        def share(count: float, of: int) -> float | None:
            return round(count / of, 4) if of else None

        k = self.selections
        return SelectionStats(
            selections=k, distinct_candidates=share(self.distinct, k), with_distinct=share(self.with_distinct, k),
            differs_from_first=share(self.differs_from_first, k),
            differs_from_random=share(self.differs_from_random, k),
            kept_shortest=share(self.kept_shortest, k), shortest_base_rate=share(self.shortest_base, k),
            kept_stopping=share(self.kept_stopping, k), stopping_base_rate=share(self.stopping_base, k),
            resamples_per_step=share(self.resamples, self.steps), prune_rate=share(self.pruned, self.ended),
            teacher_tokens_per_correct_row=round(completion_tokens / correct, 2) if correct else None,
            pruned_branch_tokens=self.pruned_tokens,
            coverage=share(len(self.covered if ids is None else self.covered & ids), problems),
        )  # fmt: skip
