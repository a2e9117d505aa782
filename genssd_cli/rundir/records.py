"""The run directory's record format: every event of events.jsonl, the trajectory row (one line of
trajectories.jsonl), the failure row and summary.json, as typed records with a schema version.

This module is the one contract between the writers (engine, runner) and the readers (replay and
materialisation, report, train, pipeline, bench). docs/records.md is generated from it
(`python -m genssd_cli.rundir.records_doc > docs/records.md`) and a test fails when the two disagree.

Readers ignore fields they do not know (a newer genssd may add some) and default the fields an
older genssd of the same format version did not write yet; a log of another format version is
refused in one line (rundir/log.py reads the log; rundir/layout.py names the files).
"""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)

SCHEMA_VERSION = 2  # 2: one `response` event per received teacher response
Ending = Literal["stop", "truncated"]
TokenSource = Literal["usage", "logprobs", "tokenizer", "split", "none"]


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True, populate_by_name=True)

    def line(self) -> str:
        """One JSON line, as written to a .jsonl file."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False) + "\n"


# ---- events.jsonl ---------------------------------------------------------------------------


class Event(Record):
    v: int = SCHEMA_VERSION
    """Format version of the log (this genssd reads and writes 2)."""
    type: str
    """The event's kind; the fields that follow depend on it."""


class TeacherServer(Record):
    pid: int
    """Process id of the llama.cpp server genssd launched for this session."""
    port: int
    """Its port on 127.0.0.1."""


class RunStart(Event):
    """A session began (written once the teacher answered, before any request of the run)."""

    type: Literal["run_start"] = "run_start"
    config_hash: str
    """Hash of the settings that change results: a resume with other ones is refused."""
    settings: dict[str, Any]
    """Those settings (teacher model and sampling, search, student, prompts, data)."""
    forced: bool
    """True when `--force` continued despite changed settings."""
    limit: int | None
    """`--limit`, when given."""
    problems: int
    """Problems in this session's run."""
    genssd: str
    """genssd's version."""
    time: float
    """Start, seconds since the epoch."""
    teacher_server: TeacherServer | None = None
    """The server launched for this session (`teacher.launch`), else null."""


class TrajectoryEvent(Event):
    problem_id: str
    """The problem's id in the dataset."""
    sample: int
    """Which of the problem's `search.samples` trajectories (0-based)."""


class Candidate(Record):
    """One continuation the teacher wrote."""

    text: str
    """What the teacher wrote."""
    finish_reason: str
    """`stop` (the model ended or a stop string matched) or `length` (max_tokens reached)."""
    tokens: int
    """Its own completion tokens; the response's `token_source` says how they were counted."""


class TeacherReply(Record):
    """One teacher reply, in one shape from the endpoint that built it, through the pool and the
    response cache, to the `response` event that logs it (and extends it) and back at replay."""

    start: int
    """Index of the first candidate this response holds within the step's n."""
    seed: int
    """The seed asked for (candidate i of a one-choice-per-request endpoint used seed + i)."""
    n: int
    """Choices asked for in this request."""
    prompt_tokens: int
    """As billed by the server (no usage: the teacher's tokenizer's count, else 0)."""
    completion_tokens: int
    """As billed by the server, all choices together; where the bill is missing, or far below what
    the choices' listed tokens hold (a server that bills one choice of n), the choices' own counts."""
    endpoint: str | None = None
    """The endpoint that answered (its name in a pool)."""
    token_source: TokenSource | None = None
    """How the candidates' `tokens` were counted: `usage` (one choice: the bill itself), `logprobs`
    (the tokens the server listed per choice, adding up to the bill or replacing a bill far below
    them), `tokenizer` (the teacher's tokenizer on each text: close, not exact), `split` (the bill
    shared evenly, unchecked: approximate) or `none` (no usage and nothing to count with: 0); null
    in logs written before genssd recorded it."""
    candidates: list[Candidate]
    """Candidates start, start + 1, …"""
    cached: bool = False
    """Answered from `teacher.cache` (an earlier run sent this request): not paid for here."""


class StepEvent(TrajectoryEvent):
    step: int
    """The trajectory's step (0 for whole-trajectory methods)."""
    attempt: int
    """0, then 1, 2, … for each re-sample of a step whose best candidate was too hard."""


class Response(TeacherReply, StepEvent):
    """One teacher response, logged the moment it arrives (before it is used)."""

    # The reply's fields follow the step's on disk: pydantic orders fields by reversed MRO.
    type: Literal["response"] = "response"

    @classmethod
    def of(cls, reply: TeacherReply, **step: Any) -> Response:
        """The event logging `reply` at a trajectory's step (problem_id, sample, step, attempt)."""
        return cls(**step, **dict(reply))


class Choice(TrajectoryEvent):
    """The student's scores of a step's candidates and the one the method kept."""

    type: Literal["choice"] = "choice"
    step: int
    """As in `response`."""
    attempt: int
    """As in `response`."""
    chosen: int
    """Index of the kept candidate (the method's selection rule)."""
    correct: list[bool] | None = None
    """Per candidate, whether its answer is right (methods that select on correctness), else null."""
    ppl: list[float | None]
    """Per candidate, the student's perplexity of its own tokens given the prompt and the prefix;
    null when it has no token of its own or was not scored (a single candidate)."""
    tokens: list[int]
    """Per candidate, the student tokens the perplexity is over."""
    rd: list[float | None] | None = None
    """`morsd`: per candidate, its Rationale Difficulty, `answer_ppl / base_ppl` (null: not correct,
    so not ranked)."""
    answer_ppl: list[float | None] | None = None
    """`morsd`: per candidate, the student's perplexity of the answer sentence (the reference in
    the student prompt's answer format: `\\boxed{REFERENCE}`, `#### REFERENCE` or `The answer is
    REFERENCE.`) after the prompt and the candidate's rationale (its text before the sentence
    stating its answer)."""
    base_ppl: float | None = None
    """`morsd`: the student's perplexity of that answer after the prompt alone."""
    kept: list[int] | None = None
    """`morsd`: the candidates kept, lowest RD first (`chosen` is the first); `standard-kd-budget`:
    every correct one, in index order."""
    pick_seed: int | None = None
    """`random-pick`, `posthoc-random`: the seed of the random pick, from `teacher.seed` and the
    step's key (null: the method's own rule picked)."""


class Prune(TrajectoryEvent):
    """The trajectory ended: even the best candidate stayed above `search.prune_ppl`."""

    type: Literal["prune"] = "prune"
    step: int
    """The step that was too hard."""
    best_ppl: float
    """The lowest candidate perplexity of its last attempt."""


class Message(Record):
    role: str
    content: str


class TrajectoryRow(Record):
    """One line of trajectories.jsonl: a TRL conversational prompt-completion row plus what
    genssd knows about it."""

    problem_id: str
    """The problem's id."""
    sample: int
    """Which of the problem's trajectories."""
    method: str
    """The selection method that produced it (`genssd`, `standard-kd`, `posthoc-ppl`, `morsd`, and the
    controls `random-pick`, `posthoc-random`, `standard-kd-budget`)."""
    prompt: list[Message]
    """The user turn, rendered with the student prompt template."""
    completion: list[Message]
    """The assistant turn: the kept trace, cut at the first stop string."""
    reference: str
    """The dataset's answer."""
    answer: str | None
    """The answer the trace states (the prompt's answer line, `\\boxed{}`, `####`); null when it
    states none (a last number written is not taken as the answer)."""
    correct: bool
    """The trace ended (`finish: stop`) and its stated answer matches the reference."""
    finish: Ending
    """`stop`: the trace ended; `truncated`: it hit max_steps, max_new_tokens or the teacher's context."""
    steps: int
    """Chunks kept (1 for whole-trajectory methods)."""
    rank: int = 0
    """Which of the rows kept from one request (`morsd.keep` > 1, `standard-kd-budget`), best first;
    else 0."""
    student_ppl: float | None
    """The student's perplexity of the whole kept completion, scored alone (null: empty)."""
    teacher_tokens: int
    """Teacher completion tokens of every candidate received for this trajectory (what it cost,
    answers from `teacher.cache` included, whoever paid for them); 0 on further rows kept from the
    same request (rank > 0), so that a sum counts it once."""
    completion_tokens: int
    """Teacher completion tokens of the kept candidates."""
    rd: float | None = None
    """`morsd`: the kept rationale's Rationale Difficulty (what `morsd.fraction` and `morsd.rows`
    select on across the dataset); absent for other methods and rows that are not correct."""

    @model_serializer(mode="wrap")
    def _without_absent_rd(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Rows of every other method are written as they were before `rd` existed, byte for byte.
        data = handler(self)
        if data.get("rd") is None:
            data.pop("rd", None)
        return data


class Finish(TrajectoryEvent):
    """The trajectory ended with a row (finished or truncated)."""

    type: Literal["finish"] = "finish"
    row: TrajectoryRow
    """The row trajectories.jsonl gets."""
    more: list[TrajectoryRow] = Field(default_factory=list)
    """Further rows kept from the same request (`morsd.keep` > 1, `standard-kd-budget`), in rank order."""


class TrajectoryError(TrajectoryEvent):
    """The teacher could not serve the trajectory after retries; a resumed run retries it."""

    type: Literal["error"] = "error"
    step: int
    """The step it failed at."""
    error_class: str
    """`timeout`, `connection`, `http_503`, `malformed`, …"""
    message: str
    """What went wrong, in one line."""


class EndpointUse(Record):
    requests: int = 0
    """Responses received from it in the session."""
    failures: dict[str, int] = Field(default_factory=dict)
    """Failed attempts by error class."""
    sidelined: int = Field(0, validation_alias=AliasChoices("sidelined", "benched"))
    """Times it was taken out of rotation after failing repeatedly."""


class SessionEnd(Event):
    """A session ended (also after Ctrl-C or a fatal error): how it ended and what it used."""

    type: Literal["session_end"] = "session_end"
    wall_s: float
    """The session's wall time."""
    end: Literal["completed", "stopped", "failed"]
    """How it ended."""
    retries: dict[str, int]
    """Teacher attempts retried, by error class."""
    teacher_busy_s: float
    """Integral of teacher requests in flight over time."""
    max_concurrency: int
    """Requests allowed in flight, all endpoints together."""
    endpoints: dict[str, EndpointUse] = Field(default_factory=dict)
    """Per endpoint."""
    engine_wall_s: float
    """Wall time of the engine's loop."""
    loop_cpu_s: float
    """CPU time of the event-loop thread (the student runs in another)."""
    candidates: int
    """Candidates received in the session."""
    student_cache_peak_mb: float | None = None
    """Peak size of the student's prefix caches."""


EVENTS: tuple[type[Event], ...] = (RunStart, Response, Choice, Prune, Finish, TrajectoryError, SessionEnd)
# Any event, told apart by its `type` (rundir/log.py parses the log with it).
EVENT = TypeAdapter(Annotated[typing.Union[EVENTS], Field(discriminator="type")])  # noqa: UP007 -- built from a tuple


# ---- failures.jsonl -------------------------------------------------------------------------


class FailureRow(Record):
    """One line of failures.jsonl: a trajectory whose latest error was not followed by an end."""

    problem_id: str
    sample: int
    step: int
    error_class: str
    message: str


# ---- summary.json ---------------------------------------------------------------------------


class Centre(Record):
    mean: float | None = None
    median: float | None = None


class TrajectoryCounts(Record):
    finished: int
    """Ended with `finish: stop`."""
    truncated: int
    """Ended with `finish: truncated`."""
    pruned: int
    """Pruned (no row)."""
    failed: int
    """Failed after retries and not ended since (in failures.jsonl)."""
    pending: int
    """Not ended yet (the run was stopped)."""


class Price(Record):
    input: float
    """Per million prompt tokens."""
    output: float
    """Per million completion tokens."""


class EndpointTotals(Record):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None = None
    failures: dict[str, int] = Field(default_factory=dict)
    sidelined: int = Field(0, validation_alias=AliasChoices("sidelined", "benched"))


class CacheTotals(Record):
    hits: int
    """Responses answered from `teacher.cache`."""
    misses: int
    """Responses a server sent (and the cache stored)."""
    saved_completion_tokens: int
    """The hits' completion tokens: not generated again."""
    saved_cost: float | None = None
    """What the hits would have cost, at today's prices (null: no price set, or a hit answered by a
    server of another pool, whose price is not known here)."""


class TeacherTotals(Record):
    requests: int
    """Responses received (retried attempts are under `retries`), from the cache included: the
    tokens below are what the method used; `cost` is what this run paid."""
    prompt_tokens: int
    """As billed, all sessions."""
    completion_tokens: int
    """As billed, all sessions."""
    candidates: int
    """Candidates received."""
    token_sources: dict[str, int] = Field(default_factory=dict)
    """Responses by how their candidates' tokens were counted (`usage`, `logprobs`: exact;
    `tokenizer`: close; `split`, `none`: approximate; `unknown`: written before genssd recorded
    it). The totals above are what the server billed, or the choices' own counts where its bill
    was missing or far below them."""
    approximate_tokens: bool = False
    """Some responses' tokens were split from a bill nothing checks, or not counted at all (see
    `token_sources`): the token totals, the cost and the kept lengths built on them are
    approximate (`genssd report` marks them)."""
    cost: float | None = None
    """At `teacher.price` (null: no price set)."""
    price_per_million: Price | None = None
    """The price the cost was computed with."""
    endpoints: dict[str, EndpointTotals] = Field(default_factory=dict)
    """Per endpoint."""
    retries: dict[str, int] = Field(default_factory=dict)
    """Attempts retried, by error class."""
    failures: dict[str, int] = Field(default_factory=dict)
    """Failed trajectories, by error class."""
    cache: CacheTotals | None = None
    """With `teacher.cache` (or responses from it): hits, misses and what they saved."""


class KeptStats(Record):
    student_ppl: Centre
    """Of the rows' `student_ppl`."""
    completion_tokens: Centre
    """Of the rows' `completion_tokens`."""


class EngineUse(Record):
    teacher_busy_fraction: float | None = None
    """Share of the allowed teacher concurrency kept busy, all sessions."""
    loop_cpu_ms_per_candidate: float | None = None
    """The event loop's own CPU time per candidate."""
    student_cache_peak_mb: float | None = None
    """Peak size of the student's prefix caches."""


class SelectionStats(Record):
    """What the method's choices did, from the log: a choice of two or more candidates is a
    selection (every attempt's, re-samples included; a one-candidate method has none). Shares are
    of selections; a base rate is what a uniform random pick would score (the mean over
    selections of matching candidates / n). Texts compare exactly; tokens are the teacher's."""

    selections: int = 0
    """Choices among two or more candidates."""
    distinct_candidates: float | None = None
    """Distinct candidate texts per selection (mean)."""
    with_distinct: float | None = None
    """Share of selections with two or more distinct texts (where a pick can matter)."""
    differs_from_first: float | None = None
    """Share of selections whose kept text differs from candidate 0's."""
    differs_from_random: float | None = None
    """Expected share of selections whose kept text differs from a uniform random pick's: the mean
    of 1 - (candidates with the kept one's text) / n (a random pick of an identical text agrees)."""
    kept_shortest: float | None = None
    """Share of selections that kept a candidate of the fewest tokens (ties count)."""
    shortest_base_rate: float | None = None
    """Mean of (candidates of the fewest tokens) / n."""
    kept_stopping: float | None = None
    """Share of selections that kept a candidate that stops (`finish_reason` stop)."""
    stopping_base_rate: float | None = None
    """Mean of (candidates that stop) / n."""
    resamples_per_step: float | None = None
    """Re-sampled attempts (attempt > 0) per step (attempt 0), all choices."""
    prune_rate: float | None = None
    """Pruned trajectories / ended trajectories (finished, truncated or pruned)."""
    teacher_tokens_per_correct_row: float | None = None
    """Teacher completion tokens of every response / correct rows (null: none correct)."""
    pruned_branch_tokens: int = 0
    """Teacher completion tokens of the responses of trajectories that were pruned."""
    coverage: float | None = None
    """Share of the run's problems with at least one correct row."""


class ShardPlan(Record):
    """shards.json of a sharded run directory (`genssd run --shards N`): fixed by the first shard
    whose teacher answered; a start with another N is refused."""

    shards: int
    """N: how many shards the problems are split into."""
    assignment: str = "sha256(problem id) mod N"
    """The rule that puts a problem in a shard (stable across runs, machines and Python versions)."""
    config_hash: str
    """The results-settings hash the run was started with."""


class Summary(Record):
    """summary.json, materialised from events.jsonl at the end of every session."""

    problems: int
    """Problems in the run."""
    problems_sha256: str | None = None
    """Hash of their ids: tells runs of the same problems apart."""
    trajectories: TrajectoryCounts
    correct: int
    """Rows marked correct."""
    steps: int
    """Choices recorded."""
    teacher: TeacherTotals
    kept: KeptStats
    engine: EngineUse = Field(default_factory=EngineUse)
    sessions: int
    """Sessions (each `genssd run` of the directory; of a sharded run: every shard's)."""
    wall_s: float
    """Their wall time, summed (a sharded run's shards ran side by side: more than it took)."""
    shards: int = 1
    """Shards the run was split into (`genssd run --shards N`)."""
    config_hash: str | None = None
    """The results hash of the latest session."""
    selection: SelectionStats | None = None
    """What the method's choices did (null in summaries written before genssd computed it)."""
