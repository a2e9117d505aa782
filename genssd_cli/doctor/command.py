"""`genssd doctor`: what each teacher endpoint really does, before hours are spent on it.

The probes (probes.py) are one or two tiny requests each, sent the way the run sends its own
(raw completions, or a partial assistant message continued through the chat API). Hard failures
(unreachable, model not served, the run's own prompt refused, a chat-continue that restarts
instead of continuing) make the command exit 1; the rest says how genssd adapts (an endpoint that
ignores or refuses `n` is asked once per candidate, stop strings are also cut on our side, a bill
of one choice of n is replaced by each choice's listed tokens) or what the user should change
(a bill genssd can only split evenly, or none at all, makes the token figures approximate).
`genssd run` runs the continuation probe itself at start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import openai
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from genssd_cli.config import RunConfig, load_run_config
from genssd_cli.errors import RuntimeFailure
from genssd_cli.problems import load_problems, render_prompt, teacher_template, teacher_token_counter
from genssd_cli.redact import printable
from genssd_cli.teacher.endpoint import Endpoint, ForeignAnswer, Prompt, Request, ShortResponse
from genssd_cli.teacher.pool import TeacherClient, check_api_keys, error_class
from genssd_cli.teacher.probes import (
    continues_verdict,
    n_honoured,
    sampler_defaults,
    seed_honoured,
    stops_honoured,
    tokens_counted,
)


@dataclass
class Finding:
    check: str
    ok: bool | None  # None: could not tell, or nothing to fix
    found: str
    then: str  # what genssd does about it, or what to change
    fatal: bool = False  # the run cannot work with this endpoint


async def diagnose(cfg: RunConfig, endpoint: Endpoint, context: int | None) -> list[Finding]:
    teacher, out = cfg.teacher, []
    started = time.monotonic()
    try:
        models = await endpoint.models()
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        return [Finding("reachable", False, f"no ({error_class(exc)})", "check the endpoint's base_url and server",
                        fatal=True)]  # fmt: skip
    except ForeignAnswer as exc:
        return [Finding("reachable", False, str(exc), "point teacher.base_url at the server's API", fatal=True)]
    out.append(Finding("reachable", True, f"yes, /v1/models in {1000 * (time.monotonic() - started):.0f} ms", ""))
    served = {m.id: m for m in models}
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
        first = await endpoint.create(Request(prompt, 1, 4, teacher.seed))
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        refused = f"the run's first prompt was refused ({error_class(exc)})"
        out.append(Finding("completion", False, refused, f"teacher.mode {teacher.mode} uses {api}: the endpoint "
                           "must serve it", fatal=True))  # fmt: skip
        return out
    except ShortResponse as exc:
        out.append(Finding("completion", False, str(exc), f"teacher.mode {teacher.mode} uses {api}", fatal=True))
        return out
    out.append(Finding("completion", True, f"{api} answers ({first.prompt_tokens} prompt tokens)", ""))

    async def tokens(endpoint: Endpoint):
        return await tokens_counted(endpoint, cfg.max_cost)

    checks = (("n > 1 honoured", n_honoured), ("seed honoured", seed_honoured),
              ("continues the prefix", continues_verdict), ("stop strings honoured", stops_honoured),
              ("token counts", tokens))  # fmt: skip
    for name, check in checks:
        try:
            out.append(Finding(name, *await check(endpoint)))
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            out.append(Finding(name, False, f"the probe request failed ({error_class(exc)})", "see the server's log"))
        except (IndexError, TypeError, AttributeError, ShortResponse):  # no choices, or no text in them
            out.append(Finding(name, False, "the answer had no usable choice", "see the server's log"))
    out.append(Finding("sampling defaults", *await sampler_defaults(endpoint)))
    continues = next(f for f in out if f.check == "continues the prefix")
    continues.fatal = teacher.mode == "chat-continue" and continues.ok is False
    counts = next(f for f in out if f.check == "token counts")
    # `genssd run` refuses max_cost with no usage and nothing to count with: so does doctor.
    counts.fatal = "max_cost is refused" in counts.then

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


def render(findings: list[Finding], endpoint: Endpoint, model: str, mode: str) -> Table:
    marks = {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]?[/]"}
    table = Table(title=escape(printable(f"genssd doctor: {model} at {endpoint.base_url} ({mode})")))
    for column in ("check", "", "found", "genssd then"):
        table.add_column(column, overflow="fold")
    for f in findings:  # what a server said, too: no escape sequences, no rich markup
        table.add_row(f.check, marks[f.ok], escape(printable(f.found)), escape(printable(f.then)))
    return table


def doctor_command(config_path: Path | None, overrides: list[str], console: Console) -> list[Finding]:
    import anyio

    from genssd_cli.teacher.servers.llama_cpp import LocalServer, launched

    cfg = load_run_config(config_path, overrides)
    check_api_keys(cfg.teacher)

    async def every_endpoint(base_url: str | None, context: int | None) -> list[tuple[Endpoint, list[Finding]]]:
        pool = TeacherClient(cfg.teacher, base_url, count_tokens=teacher_token_counter(cfg.prompts),
                             api_key=server.api_key if server else None)  # fmt: skip
        try:
            return [(e, await diagnose(cfg, e, context)) for e in pool.endpoints]
        finally:
            await pool.aclose()

    server = None
    if cfg.teacher.launch is None:
        results = anyio.run(every_endpoint, None, None)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            server = LocalServer(cfg.teacher.launch, cfg.teacher.model, Path(scratch) / "teacher-server.log")
            console.print(f"starting teacher server for {cfg.teacher.launch.gguf} …", markup=False)
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
