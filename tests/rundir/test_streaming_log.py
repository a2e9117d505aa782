"""The run log read in one streaming pass (results.RunLog): the files materialised from it are
byte for byte those of a plain list-based reading (the code before, written out below as the
reference), on the recorded runs, on logs with every kind of record, and on the synthetic
paper-shaped log of `genssd bench resume`; what a resume keeps is only the open trajectories."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, genssd

from genssd_cli.config import TeacherConfig, load_run_config
from genssd_cli.files import SortedSpool, write_atomic
from genssd_cli.problems import Problem, load_problems
from genssd_cli.run.materialise import materialise as materialise_store
from genssd_cli.rundir.layout import EVENTS, FAILURES, SUMMARY, TRAJECTORIES
from genssd_cli.rundir.log import iter_log, read_events
from genssd_cli.rundir.records import (
    CacheTotals,
    Candidate,
    Centre,
    Choice,
    EndpointTotals,
    EndpointUse,
    EngineUse,
    FailureRow,
    Finish,
    KeptStats,
    Message,
    Price,
    Prune,
    Response,
    RunStart,
    SelectionStats,
    SessionEnd,
    Summary,
    TeacherTotals,
    TrajectoryCounts,
    TrajectoryError,
    TrajectoryRow,
)
from genssd_cli.rundir.replay import Replay, RunLog, scan_events
from genssd_cli.rundir.store import RunStore, torn_tail

RECORDED = ROOT / "tests" / "data" / "compare-recorded"


# ---- the reference: the list-based reading of the code before (c083b59), kept plain ------------


def ref_files(events: list, problems: list[Problem], samples: int, teacher: TeacherConfig) -> dict[str, bytes]:
    ended = {(e.problem_id, e.sample) for e in events if isinstance(e, Finish | Prune)}
    order = {p.id: i for i, p in enumerate(problems)}
    rows = sorted([r for e in events if isinstance(e, Finish) for r in (e.row, *e.more)],
                  key=lambda r: (order.get(r.problem_id, len(order)), r.problem_id, r.sample, r.rank))  # fmt: skip
    latest: dict = {}
    for e in events:
        if isinstance(e, TrajectoryError) and (e.problem_id, e.sample) not in ended:
            latest[(e.problem_id, e.sample)] = e
    failures = [FailureRow.model_validate(e.model_dump(exclude={"v", "type"})) for e in latest.values()]
    responses = [e for e in events if isinstance(e, Response)]
    sessions = [e for e in events if isinstance(e, SessionEnd)]
    starts = [e for e in events if isinstance(e, RunStart)]

    def cost(e: Response) -> float:
        price = teacher.price_of(e.endpoint)
        return price.cost(e.prompt_tokens, e.completion_tokens) if price else 0.0

    spent = sum(cost(e) for e in responses if not e.cached) if teacher.priced else None
    endpoints: dict[str, EndpointTotals] = {}

    def entry(name: str) -> EndpointTotals:
        return endpoints.setdefault(name, EndpointTotals(requests=0, prompt_tokens=0, completion_tokens=0,
                                                         cost=0.0 if teacher.priced else None))  # fmt: skip

    for e in events:
        if isinstance(e, Response) and not e.cached:
            row = entry(e.endpoint or "teacher")
            row.requests += 1
            row.prompt_tokens += e.prompt_tokens
            row.completion_tokens += e.completion_tokens
            if row.cost is not None:
                row.cost += cost(e)
        elif isinstance(e, SessionEnd):
            for name, seen in e.endpoints.items():
                row = entry(name)
                row.failures = dict(Counter(row.failures) + Counter(seen.failures))
                row.sidelined += seen.sidelined
    for row in endpoints.values():
        row.failures = dict(sorted(row.failures.items()))
        if row.cost is not None:
            row.cost = round(row.cost, 6)
    hits = [e for e in responses if e.cached]
    cache = None
    if teacher.cache is not None or hits:
        cache = CacheTotals(hits=len(hits), misses=len(responses) - len(hits),
                            saved_completion_tokens=sum(e.completion_tokens for e in hits),
                            saved_cost=round(sum(cost(e) for e in hits), 6) if teacher.priced else None)  # fmt: skip

    def centre(values: list) -> Centre:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return Centre()
        return Centre(mean=round(statistics.fmean(finite), 4), median=round(statistics.median(finite), 4))

    retries: Counter = Counter()
    for s in sessions:
        retries.update(s.retries)
    allowed = sum(s.max_concurrency * s.engine_wall_s for s in sessions)
    candidates = sum(s.candidates for s in sessions)
    wanted = {(p.id, s) for p in problems for s in range(samples)}
    summary = Summary(
        problems=len(problems),
        problems_sha256=hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()[:16],
        trajectories=TrajectoryCounts(
            finished=sum(1 for r in rows if r.finish == "stop"),
            truncated=sum(1 for r in rows if r.finish == "truncated"),
            pruned=sum(1 for e in events if isinstance(e, Prune)), failed=len(failures),
            pending=len(wanted - ended) - len(failures),
        ),
        correct=sum(1 for r in rows if r.correct),
        steps=sum(1 for e in events if isinstance(e, Choice)),
        teacher=TeacherTotals(
            requests=len(responses), prompt_tokens=sum(e.prompt_tokens for e in responses),
            completion_tokens=sum(e.completion_tokens for e in responses),
            candidates=sum(len(e.candidates) for e in responses),
            token_sources=dict(sorted(Counter(e.token_source or "unknown" for e in responses).items())),
            cost=round(spent, 6) if spent is not None else None,
            price_per_million=Price.model_validate(teacher.price.model_dump()) if teacher.price else None,
            endpoints=endpoints, retries=dict(sorted(retries.items())),
            failures=dict(sorted(Counter(f.error_class for f in failures).items())), cache=cache,
        ),
        kept=KeptStats(student_ppl=centre([r.student_ppl for r in rows]),
                       completion_tokens=centre([r.completion_tokens for r in rows])),
        engine=EngineUse(
            teacher_busy_fraction=round(sum(s.teacher_busy_s for s in sessions) / allowed, 4) if allowed else None,
            loop_cpu_ms_per_candidate=round(1000 * sum(s.loop_cpu_s for s in sessions) / candidates, 3)
            if candidates else None,
            student_cache_peak_mb=max((s.student_cache_peak_mb or 0 for s in sessions), default=None),
        ),
        sessions=len(sessions), wall_s=round(sum(s.wall_s for s in sessions), 1),
        config_hash=starts[-1].config_hash if starts else None,
        selection=ref_selection(events, problems),
    )  # fmt: skip
    return {
        TRAJECTORIES: "".join(r.line() for r in rows).encode(),
        FAILURES: "".join(r.line() for r in failures).encode(),
        SUMMARY: (json.dumps(summary.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n").encode(),
    }


def ref_selection(events: list, problems: list[Problem]) -> SelectionStats:
    """The selection diagnostics read plainly: every choice with its step's candidates at hand."""
    first_end: dict = {}
    for i, e in enumerate(events):
        if isinstance(e, Finish | Prune):
            first_end.setdefault((e.problem_id, e.sample), i)
    ends = [events[i] for i in sorted(first_end.values())]

    def open_at(e, i: int) -> bool:  # the trajectory had not ended when this event came
        return first_end.get((e.problem_id, e.sample), len(events)) > i

    picks = []
    for i, c in enumerate(events):
        if not isinstance(c, Choice) or len(c.ppl) < 2 or not open_at(c, i):
            continue
        have: dict = {}
        for r in events[:i]:
            if isinstance(r, Response) and (r.problem_id, r.sample, r.step, r.attempt) == (c.problem_id, c.sample,
                                                                                        c.step, c.attempt):  # fmt: skip
                have.update({r.start + k: x for k, x in enumerate(r.candidates)})
        if all(k in have for k in range(len(c.ppl))):
            picks.append(([have[k] for k in range(len(c.ppl))], c.chosen))

    def share(values: list) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    attempts = [c.attempt for c in events if isinstance(c, Choice)]
    pruned = {(e.problem_id, e.sample) for e in ends if isinstance(e, Prune)}
    rows = [r for e in ends if isinstance(e, Finish) for r in (e.row, *e.more)]
    correct = sum(r.correct for r in rows)
    tokens = sum(e.completion_tokens for e in events if isinstance(e, Response))
    covered = {r.problem_id for r in rows if r.correct} & {p.id for p in problems}
    return SelectionStats(
        selections=len(picks),
        distinct_candidates=share([len({x.text for x in cs}) for cs, _ in picks]),
        with_distinct=share([len({x.text for x in cs}) > 1 for cs, _ in picks]),
        differs_from_first=share([cs[k].text != cs[0].text for cs, k in picks]),
        differs_from_random=share([1 - [x.text for x in cs].count(cs[k].text) / len(cs) for cs, k in picks]),
        kept_shortest=share([cs[k].tokens == min(x.tokens for x in cs) for cs, k in picks]),
        shortest_base_rate=share([sum(x.tokens == min(y.tokens for y in cs) for x in cs) / len(cs) for cs, _ in picks]),
        kept_stopping=share([cs[k].finish_reason == "stop" for cs, k in picks]),
        stopping_base_rate=share([sum(x.finish_reason == "stop" for x in cs) / len(cs) for cs, _ in picks]),
        resamples_per_step=round(sum(a > 0 for a in attempts) / attempts.count(0), 4) if 0 in attempts else None,
        prune_rate=round(len(pruned) / len(ends), 4) if ends else None,
        teacher_tokens_per_correct_row=round(tokens / correct, 2) if correct else None,
        pruned_branch_tokens=sum(e.completion_tokens for i, e in enumerate(events)
                                 if isinstance(e, Response) and (e.problem_id, e.sample) in pruned and open_at(e, i)),
        coverage=round(len(covered) / len(problems), 4) if problems else None,
    )  # fmt: skip


def materialised(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in (TRAJECTORIES, FAILURES, SUMMARY)}


def materialise(run_dir: Path, problems: list[Problem], cfg) -> dict[str, bytes]:
    """What `genssd run` writes at the end of a session (run/materialise.py: one streaming pass)."""
    with RunStore(run_dir) as store:
        materialise_store(store, problems, cfg)
    return materialised(run_dir)


# ---- recorded runs ------------------------------------------------------------------------------


SUMMARY_FIELDS_SINCE_RECORDED = {"shards": 1}
# Computed from the log since (not a default): the recorded runs' selection diagnostics, pinned in part.
RECORDED_SELECTION = {
    "genssd": {"selections": 20, "distinct_candidates": 1.6, "with_distinct": 0.3, "differs_from_first": 0.25,
               "prune_rate": 0.0, "resamples_per_step": 0.0, "pruned_branch_tokens": 0, "coverage": 0.7},
    "standard-kd": {"selections": 0, "distinct_candidates": None, "prune_rate": 0.0, "coverage": 0.4,
                    "teacher_tokens_per_correct_row": 57.75},
    "posthoc-ppl": {"selections": 10, "with_distinct": 0.8, "kept_shortest": 0.6, "shortest_base_rate": 0.675,
                    "coverage": 0.8},
}


@pytest.mark.parametrize("method", ["genssd", "standard-kd", "posthoc-ppl"])
def test_recorded_runs_materialise_as_the_list_reading_and_as_recorded(method, tmp_path):
    run = tmp_path / method
    shutil.copytree(RECORDED / method / "run", run)
    recorded = materialised(run)
    cfg = load_run_config(run / "config.yaml")
    events = read_events(run)
    start = [e for e in events if isinstance(e, RunStart)][-1]
    problems = load_problems(cfg.data, start.limit)
    ours = materialise(run, problems, cfg)
    assert ours == ref_files(events, problems, cfg.search.samples, cfg.teacher)
    # The files the code before wrote when the run was recorded; summary.json has gained fields since,
    # each at its default for such a run.
    assert {k: v for k, v in ours.items() if k != SUMMARY} == {k: v for k, v in recorded.items() if k != SUMMARY}
    ours_summary = json.loads(ours[SUMMARY])
    selection = ours_summary.pop("selection")
    assert ours_summary["teacher"].pop("approximate_tokens") is False  # a field since: every count was exact
    assert ours_summary == {**json.loads(recorded[SUMMARY]), **SUMMARY_FIELDS_SINCE_RECORDED}
    assert selection == ref_selection(events, problems).model_dump(mode="json")
    assert {k: selection[k] for k in RECORDED_SELECTION[method]} == RECORDED_SELECTION[method]


# ---- a log with every kind of record -------------------------------------------------------------


def response(pid: str, sample: int, step: int, attempt: int = 0, *, start: int = 0, n: int = 2, endpoint=None,
             cached: bool = False, source=None) -> Response:  # fmt: skip
    candidates = [Candidate(text=f"{pid}/{sample}/{step}/{attempt}/{start + i} é", finish_reason="length",
                                  tokens=7 + i) for i in range(n)]  # fmt: skip
    return Response(problem_id=pid, sample=sample, step=step, attempt=attempt, start=start, seed=step, n=n,
                    prompt_tokens=101 + step, completion_tokens=sum(c.tokens for c in candidates), endpoint=endpoint,
                    token_source=source, candidates=candidates, cached=cached)  # fmt: skip


def choice(pid: str, sample: int, step: int, attempt: int = 0) -> Choice:
    return Choice(problem_id=pid, sample=sample, step=step, attempt=attempt, chosen=1, ppl=[2.5, None], tokens=[7, 0])


def row(pid: str, sample: int, *, rank: int = 0, finish: str = "stop", ppl: float | None = 1.75,
        correct: bool = True, tokens: int = 30) -> TrajectoryRow:  # fmt: skip
    return TrajectoryRow(problem_id=pid, sample=sample, method="genssd", prompt=[Message(role="user", content="Q")],
                         completion=[Message(role="assistant", content=f"{pid} {sample} {rank} ✓")], reference="1",
                         answer="1", correct=correct, finish=finish, steps=2, rank=rank, student_ppl=ppl,
                         teacher_tokens=40 * (rank == 0), completion_tokens=tokens)  # fmt: skip


def error(pid: str, sample: int, step: int, message: str, error_class: str = "timeout") -> TrajectoryError:
    return TrajectoryError(problem_id=pid, sample=sample, step=step, error_class=error_class, message=message)


def session(end: str, **endpoints: dict) -> SessionEnd:
    return SessionEnd(wall_s=12.34, end=end, retries={"timeout": 2, "http_503": 1}, teacher_busy_s=3.3,
                      max_concurrency=4, endpoints={k: EndpointUse(**v) for k, v in endpoints.items()},
                      engine_wall_s=11.1, loop_cpu_s=0.7, candidates=17, student_cache_peak_mb=12.5)  # fmt: skip


def start(settings: dict, config_hash: str = "h1") -> RunStart:
    return RunStart(config_hash=config_hash, settings=settings, forced=False, limit=None, problems=5, genssd="t",
                    time=1.0)  # fmt: skip


PROBLEMS = [Problem(pid, "Q", "1") for pid in ("p3", "p1", "p2", "p4", "p5")]
OPEN = {("p4", 1), ("p5", 0)}  # started, never ended


def every_kind() -> list:
    """Two sessions: interleaved trajectories, a re-sampled step, a prune, MoRSD rows (rank 1, 2),
    a truncated row, errors later retried and finished or pruned, an error never retried, an
    error logged after its trajectory ended, responses from the cache, a pool of two priced endpoints,
    a row of a problem not in the run's list, a response not yet scored, and open trajectories."""
    return [
        start({"a": 1}),
        response("p1", 0, 0, endpoint="a", source="usage"), response("p3", 0, 0, endpoint="b", source="logprobs"),
        choice("p1", 0, 0), response("p1", 0, 1, endpoint="a"), choice("p3", 0, 0),
        choice("p1", 0, 1), response("p1", 0, 1, 1, endpoint="b", cached=True), choice("p1", 0, 1, 1),
        Finish(problem_id="p1", sample=0, row=row("p1", 0)),
        error("p3", 0, 1, "timed out"), error("p3", 0, 1, "timed out again", "connection"),
        error("p2", 1, 0, "retried, then pruned"), response("p2", 1, 0, endpoint="a"), choice("p2", 1, 0),
        Prune(problem_id="p2", sample=1, step=0, best_ppl=9.5),
        error("p2", 1, 0, "after its end: not a failure"),
        response("p4", 1, 0, endpoint="b", cached=True), choice("p4", 1, 0), response("p4", 1, 1, endpoint="b"),
        session("stopped", a={"requests": 3, "failures": {"timeout": 2}}, b={"requests": 2, "sidelined": 1}),
        start({"a": 1}, "h2"),
        response("p3", 0, 1, endpoint="a", start=0, n=1), response("p3", 0, 1, endpoint="b", start=1, n=1),
        choice("p3", 0, 1),
        Finish(problem_id="p3", sample=0, row=row("p3", 0, finish="truncated", correct=False, ppl=None)),
        response("p2", 0, 0, endpoint="a"), choice("p2", 0, 0),
        Finish(problem_id="p2", sample=0, row=row("p2", 0, ppl=3.25), more=[row("p2", 0, rank=1, ppl=float("inf")),
                                                                           row("p2", 0, rank=2, tokens=31)]),
        Finish(problem_id="gone", sample=0, row=row("gone", 0, ppl=2.0)),
        error("p1", 1, 0, "never retried", "http_503"), error("p3", 1, 0, "retried below"),
        response("p3", 1, 0, endpoint="a"), choice("p3", 1, 0), Finish(problem_id="p3", sample=1, row=row("p3", 1)),
        response("p5", 0, 0, endpoint="a"),
        session("completed", a={"requests": 4, "failures": {"timeout": 1, "http_503": 1}}),
    ]  # fmt: skip


@pytest.mark.parametrize("priced", [True, False])
@pytest.mark.parametrize("in_memory", [0, 32 << 20], ids=["rows-on-disk", "rows-in-memory"])
def test_every_kind_of_record_materialises_as_the_list_reading(tmp_path, priced, in_memory):
    events = every_kind()
    log_path = tmp_path / EVENTS
    log_path.write_text("".join(e.line() for e in events) + '{"v": 2, "type": "resp')  # and a torn tail
    pool = [{"name": "a", "base_url": "http://a/v1", "price": {"input": 0.7, "output": 2.9}},
            {"name": "b", "base_url": "http://b/v1"}]  # fmt: skip
    prices = {"price": {"input": 1.1, "output": 3.3}, "endpoints": pool} if priced else {"base_url": "http://t/v1"}
    teacher = TeacherConfig(model="t", **prices, cache="cache.sqlite" if priced else None)
    with RunLog(teacher, SortedSpool(tmp_path / TRAJECTORIES, in_memory=in_memory)) as log:
        log.read(log_path)
        if in_memory == 0:  # the rows really went to a file: none is held
            assert log.rows.on_disk
        ours = {
            TRAJECTORIES: b"".join(log.trajectory_lines(PROBLEMS)),
            FAILURES: "".join(r.line() for r in log.failure_rows()).encode(),
            SUMMARY: json.dumps(log.summary(PROBLEMS, 2).model_dump(mode="json"), indent=2, ensure_ascii=False),
        }
    ours[SUMMARY] = (ours[SUMMARY] + "\n").encode()
    reference = ref_files(list(iter_log(log_path)), PROBLEMS, 2, teacher)
    assert ours == reference
    summary = json.loads(ours[SUMMARY])
    # The log really has what the reference is meant to check (not vacuously equal).
    assert summary["trajectories"] == {"finished": 6, "truncated": 1, "pruned": 1, "failed": 1, "pending": 4}
    assert [json.loads(line)["problem_id"] for line in ours[FAILURES].splitlines()] == ["p1"]
    order = [(r["problem_id"], r["sample"], r["rank"]) for r in map(json.loads, ours[TRAJECTORIES].splitlines())]
    assert order == [("p3", 0, 0), ("p3", 1, 0), ("p1", 0, 0), ("p2", 0, 0), ("p2", 0, 1), ("p2", 0, 2), ("gone", 0, 0)]
    assert (summary["teacher"]["cost"] is not None) == priced and summary["teacher"]["cache"]["hits"] == 2


def test_a_resume_keeps_only_the_open_trajectories_and_replays_as_the_whole_log(tmp_path):
    events = every_kind()
    (tmp_path / EVENTS).write_text("".join(e.line() for e in events))
    log = scan_events(tmp_path)
    whole = {}  # the replay of the code before: every response and choice, by step
    for e in events:
        if isinstance(e, Response | Choice):
            whole.setdefault((e.problem_id, e.sample, e.step, e.attempt), []).append(e)
    ended = {(e.problem_id, e.sample): e for e in events if isinstance(e, Finish | Prune)}
    open_steps = {k: v for k, v in whole.items() if k[:2] not in ended}
    assert {k[:2] for k in open_steps} == OPEN
    # Only what the engine replays is held: the open trajectories' responses and choices.
    assert set(log.replay.responses) | set(log.replay.choices) == set(open_steps)
    for key, recorded in open_steps.items():
        assert log.replay.responses.get(key, []) == [e for e in recorded if isinstance(e, Response)]
        assert log.replay.choices.get(key) == next((e for e in reversed(recorded) if isinstance(e, Choice)), None)
    # An ended one is counted as the engine counted the event itself.
    assert set(log.replay.ended) == set(ended)
    p2 = log.replay.ended[("p2", 0)]
    assert (p2.finished, p2.truncated, p2.correct, p2.pruned) == (3, 0, 3, 0)
    assert log.replay.ended[("p2", 1)].pruned == 1 and log.replay.ended[("p3", 0)].truncated == 1
    assert Replay(events).responses == log.replay.responses  # the list form is the same replay
    assert log.last_start.config_hash == "h2" and log.events == len(events)
    assert not log.all_ended(PROBLEMS, 2) and log.all_ended(PROBLEMS[:1], 1)


def test_a_second_read_is_free_unless_the_log_changed(tmp_path):
    (tmp_path / EVENTS).write_text("".join(e.line() for e in every_kind()[:5]))
    first = scan_events(tmp_path)
    assert scan_events(tmp_path, previous=first) is first
    with open(tmp_path / EVENTS, "a") as f:
        f.write(choice("p3", 0, 0).line())
    again = scan_events(tmp_path, previous=first)
    assert again is not first and again.steps == first.steps + 1
    with pytest.raises(Exception, match="settings"):
        again.check_resume({"a": 2}, force=False)
    again.check_resume({"a": 2}, force=True)


# ---- the pieces: a tail read from the end, a file written as it comes ---------------------------


@pytest.mark.parametrize("tail", [b"", b'{"v": 2, "type": "resp', b"x" * 200_000])
def test_the_torn_tail_is_found_from_the_end(tmp_path, tail):
    (tmp_path / EVENTS).write_bytes(b"a" * 150_000 + b"\n" + tail)
    assert torn_tail(tmp_path) == tail
    (tmp_path / EVENTS).write_bytes(tail)  # no newline at all: all of it is torn
    assert torn_tail(tmp_path) == tail


def test_a_file_written_in_pieces_is_whole_or_the_old_one(tmp_path):
    path = tmp_path / "out.jsonl"
    write_atomic(path, iter([b"a\n", b"b\n"]))
    assert path.read_bytes() == b"a\nb\n"

    def broken():
        yield b"c\n"
        raise RuntimeError("the source failed half-way")

    with pytest.raises(RuntimeError):
        write_atomic(path, broken())
    assert path.read_bytes() == b"a\nb\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# ---- the bench, small ----------------------------------------------------------------------------


def test_bench_resume_measures_both_checkouts_and_the_files_are_the_list_readings(tmp_path):
    out = tmp_path / "bench"
    done = genssd("bench", "resume", "--problems", "200", "--samples", "2", "--out", str(out), "--baseline", str(ROOT),
                  timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    written, ours, theirs, ratio = lines
    run = out / "run"
    assert written["log_bytes"] == (run / EVENTS).stat().st_size > 0 and written["problems"] == 200
    events = read_events(run)
    assert written["events"] == len(events)
    for line in (ours, theirs):
        assert line["checkout"] in {"this", "baseline"} and line["code"] == "streaming"
        assert line["peak_rss_mb"] > 0 and line["seconds"] >= line["resume_s"] >= 0
        assert line["log_bytes"] == written["log_bytes"]
    assert ratio["same_files"] is True and ratio["peak_rss"] > 0
    # The paper shape: responses of n candidates of chunk_tokens text, prunes, errors, open ones.
    kinds = Counter(e.type for e in events)
    assert kinds["run_start"] == kinds["session_end"] == 2 and kinds["prune"] > 0 and kinds["error"] > 0
    assert all(len(e.candidates) == 4 and len(e.candidates[0].text) > 900 for e in events if e.type == "response")
    ended = {(e.problem_id, e.sample) for e in events if e.type in ("finish", "prune")}
    opened = {(e.problem_id, e.sample) for e in events if e.type == "response"} - ended
    assert opened and ours["open_steps_replayed"] >= written["open"] > 0
    cfg = load_run_config(out / "config.yaml")
    problems = load_problems(cfg.data)
    reference = ref_files(events, problems, cfg.search.samples, cfg.teacher)
    assert materialised(run) == reference
    assert json.loads(reference[SUMMARY])["trajectories"]["failed"] > 0
    assert ours["files_sha256"] == {k: hashlib.sha256(v).hexdigest()[:16] for k, v in reference.items()}


def test_a_baseline_that_is_not_a_checkout_is_one_line(tmp_path):
    done = genssd("bench", "resume", "--problems", "3", "--baseline", str(tmp_path))
    assert done.returncode != 0 and done.stderr.startswith("error: --baseline") and "Traceback" not in done.stderr
