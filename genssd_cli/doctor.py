"""`genssd doctor`: what each teacher endpoint really does, before hours are spent on it.

Each probe is one or two tiny requests (a few tokens each), sent the way the run sends its own
(raw completions, or a partial assistant message continued through the chat API). Hard failures
(unreachable, model not served, the run's own prompt refused, a chat-continue that restarts
instead of continuing) make the command exit 1; the rest says how genssd adapts (an endpoint that
ignores or refuses `n` is asked once per candidate, stop strings are also cut on our side) or
what the user should change. `genssd run` runs the continuation probe itself at start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import openai
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from genssd_cli.config import RunConfig, TeacherConfig, load_run_config
from genssd_cli.data import load_problems, render_prompt, teacher_template
from genssd_cli.endpoint import Endpoint, Prompt
from genssd_cli.errors import RuntimeFailure
from genssd_cli.teacher import TeacherClient, check_api_keys, error_class

# A model that continues the text completes "10"; one that starts a new answer does not. (Ending
# on a whole number is not enough: llama.cpp's chat API starts a new turn and still says "9".)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 1"
COUNT_ASK = "Count from 1 to 20, separated by commas."
LINES = "red\ngreen\nblue\nred\ngreen\nblue\nred\n"  # the next chunk crosses a newline
LINES_ASK = "Repeat red, green, blue, one per line, without end."
STORY, STORY_ASK = "Once upon a time", "Tell me a short story."


@dataclass
class Finding:
    check: str
    ok: bool | None  # None: could not tell, or nothing to fix
    found: str
    then: str  # what genssd does about it, or what to change
    fatal: bool = False  # the run cannot work with this endpoint


Verdict = tuple[bool, str, str]  # ok, found, what genssd does about it


def probe_prompt(teacher: TeacherConfig, ask: str, text: str) -> Prompt:
    """`text` to continue: raw in completions mode, the assistant's partial answer to `ask` in chat."""
    return Prompt("", text) if teacher.mode == "completions" else Prompt(ask, text)


async def diagnose(cfg: RunConfig, endpoint: Endpoint, context: int | None) -> list[Finding]:
    teacher, out = cfg.teacher, []
    started = time.monotonic()
    try:
        models = await endpoint.client.models.list()
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        return [Finding("reachable", False, f"no ({error_class(exc)})", "check the endpoint's base_url and server",
                        fatal=True)]  # fmt: skip
    out.append(Finding("reachable", True, f"yes, /v1/models in {1000 * (time.monotonic() - started):.0f} ms", ""))
    served = {m.id: m for m in models.data}
    if served and teacher.model not in served:
        listed = ", ".join(list(served)[:5])
        out.append(Finding("model listed", False, f"{teacher.model!r} is not served", f"serves: {listed}", fatal=True))
        return out
    out.append(Finding("model listed", True if served else None, teacher.model if served else "the list is empty", ""))
    listed_context = getattr(served.get(teacher.model), "max_model_len", None)
    context = context or listed_context

    # The run's own first prompt, as the run would send it.
    api = "/v1/completions" if teacher.mode == "completions" else "/v1/chat/completions"
    problem = load_problems(cfg.data, 1)[0]
    prompt = Prompt(render_prompt(teacher_template(cfg.prompts, cfg.teacher), problem.question))
    try:
        first = await endpoint.create(prompt, 1, 4, teacher.seed)
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        refused = f"the run's first prompt was refused ({error_class(exc)})"
        out.append(Finding("completion", False, refused, f"teacher.mode {teacher.mode} uses {api}: the endpoint "
                           "must serve it", fatal=True))  # fmt: skip
        return out
    out.append(Finding("completion", True, f"{api} answers ({first.prompt_tokens} prompt tokens)", ""))

    for name, check in (("n > 1 honoured", _n_honoured), ("seed honoured", _seed_honoured),
                        ("continues the prefix", continues_verdict), ("stop strings honoured", _stops)):  # fmt: skip
        try:
            out.append(Finding(name, *await check(endpoint)))
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            out.append(Finding(name, False, f"the probe request failed ({error_class(exc)})", "see the server's log"))
        except (IndexError, TypeError, AttributeError):  # no choices, or no text in them
            out.append(Finding(name, False, "the answer had no usable choice", "see the server's log"))
    continues = next(f for f in out if f.check == "continues the prefix")
    continues.fatal = teacher.mode == "chat-continue" and continues.ok is False

    need = first.prompt_tokens + cfg.search.max_new_tokens
    if context is None:
        out.append(Finding("context length", None, "not reported by the endpoint",
                           "a trajectory that outgrows it ends truncated, recorded as such"))  # fmt: skip
    else:
        fits = first.prompt_tokens > 0 and need <= context
        out.append(Finding("context length", fits, f"{context} tokens; the first problem needs up to {need} "
                           f"({first.prompt_tokens} prompt + search.max_new_tokens {cfg.search.max_new_tokens})",
                           "" if fits else "lower search.max_new_tokens or serve a longer context"))  # fmt: skip
    return out


async def _n_honoured(endpoint: Endpoint) -> Verdict:
    try:
        answer = await endpoint.create(probe_prompt(endpoint.teacher, STORY_ASK, STORY), 3, 4, 1, temperature=1.0)
    except openai.BadRequestError as exc:
        return (False, f"asked 3 choices: refused (400: {str(exc)[:80]})",
                "asked once per candidate (seeds seed+i): same results, n times the requests")  # fmt: skip
    got = len(answer.candidates)
    return (got == 3, f"asked 3 choices, got {got}",
            "one request per step" if got == 3 else
            "asked once per candidate (seeds seed+i): same results, n times the requests")  # fmt: skip


async def _seed_honoured(endpoint: Endpoint) -> Verdict:
    prompt = probe_prompt(endpoint.teacher, STORY_ASK, STORY)
    texts = [(await endpoint.create(prompt, 1, 8, s, temperature=1.0)).candidates[0].text for s in (7, 7, 8)]
    same, varies = texts[0] == texts[1], texts[0] != texts[2]
    found = ("same seed, same text; another seed, another" if same and varies else
             "same seed, same text, but another seed too: sampling looks off" if same else "same seed, other text")
    then = "" if same and varies else "resume still never asks twice (responses are logged); a fresh rerun differs"
    return same and varies, found, then  # fmt: skip


async def continues_verdict(endpoint: Endpoint) -> Verdict:
    teacher = endpoint.teacher
    answer = await endpoint.create(probe_prompt(teacher, COUNT_ASK, COUNTING), 1, 4, 0, temperature=0.0, stop=[])
    counted = answer.candidates[0].text
    continues = counted.startswith("0")
    if teacher.mode == "completions":
        advice = ("it restarts or ignores the text: Gen-SSD needs an endpoint that continues a partial "
                  "trace (a base or completions-capable model)")  # fmt: skip
    else:
        other = "prefix" if teacher.prefill == "continue_final_message" else "continue_final_message"
        advice = (f"the partial assistant message was not continued (prefill {teacher.prefill}): "
                  f"try teacher.prefill: {other}, or teacher.mode: completions with the teacher's chat template")
    return continues, f"{COUNTING!r} -> {counted!r}", "" if continues else advice


async def _stops(endpoint: Endpoint) -> Verdict:
    prompt = probe_prompt(endpoint.teacher, LINES_ASK, LINES)
    lines = (await endpoint.create(prompt, 1, 12, 0, temperature=0.0, stop=["\n"])).candidates[0].text
    stops = "\n" not in lines
    return (stops, f"stop ['\\n'] -> {lines!r}",
            "" if stops else "genssd cuts at teacher.stop itself; the tokens past it are still paid for")


async def preflight(teacher: TeacherClient) -> None:
    """`genssd run` in chat-continue mode: one 4-token request per reachable endpoint proves that
    a partial assistant message is continued, not answered anew; refuse the run otherwise."""
    now = time.monotonic()
    for endpoint in (e for e in teacher.endpoints if e.healthy(now)):
        try:
            ok, found, advice = await continues_verdict(endpoint)
        except openai.BadRequestError as exc:
            ok, found, advice = False, f"refused (400: {str(exc)[:80]})", "run genssd doctor CONFIG"
        if not ok:
            raise RuntimeFailure(f"teacher {endpoint.base_url} does not continue a partial trace in chat-continue mode "
                                 f"({found}): {advice}; genssd doctor CONFIG tells more "
                                 "(teacher.preflight: false skips this check)")  # fmt: skip


def render(findings: list[Finding], endpoint: Endpoint, model: str, mode: str) -> Table:
    marks = {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]?[/]"}
    table = Table(title=f"genssd doctor: {model} at {endpoint.base_url} ({mode})")
    for column in ("check", "", "found", "genssd then"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(f.check, marks[f.ok], escape(f.found), escape(f.then))
    return table


def doctor_command(config_path: Path | None, overrides: list[str], console: Console) -> list[Finding]:
    import anyio

    from genssd_cli.launch import LocalServer, launched

    cfg = load_run_config(config_path, overrides)
    check_api_keys(cfg.teacher)

    async def every_endpoint(base_url: str | None, context: int | None) -> list[tuple[Endpoint, list[Finding]]]:
        pool = TeacherClient(cfg.teacher, base_url)
        try:
            return [(e, await diagnose(cfg, e, context)) for e in pool.endpoints]
        finally:
            await pool.aclose()

    if cfg.teacher.launch is None:
        results = anyio.run(every_endpoint, None, None)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            server = LocalServer(cfg.teacher.launch, cfg.teacher.model, Path(scratch) / "teacher-server.log")
            console.print(f"starting teacher server for {cfg.teacher.launch.gguf} …")
            with launched(server):
                server.wait_ready()
                results = anyio.run(every_endpoint, server.base_url, cfg.teacher.launch.n_ctx)
    fatal = []
    for endpoint, findings in results:
        console.print(render(findings, endpoint, cfg.teacher.model, cfg.teacher.mode))
        where = f"{endpoint.name}: " if len(results) > 1 else ""
        fatal += [where + f.check for f in findings if f.fatal]
    if fatal:
        raise RuntimeFailure(f"the teacher endpoint cannot serve a run: {', '.join(fatal)} failed")
    return [f for _, findings in results for f in findings]
