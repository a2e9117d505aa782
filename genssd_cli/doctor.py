"""`genssd doctor`: what the teacher endpoint really does, before hours are spent on it.

Each probe is one or two tiny requests (a few tokens each). Hard failures (unreachable, model
not served, the run's own prompt refused) make the command exit 1; the rest says how genssd
adapts (an endpoint that ignores `n` is asked once per candidate, stop strings are also cut on
our side) or what the user should change.
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
from genssd_cli.data import load_problems, load_prompt, render_prompt
from genssd_cli.errors import RuntimeFailure
from genssd_cli.teacher import api_key, error_class

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # any model that continues text goes on with 9
LINES = "red\ngreen\nblue\nred\ngreen\nblue\nred\n"  # the next chunk crosses a newline


@dataclass
class Finding:
    check: str
    ok: bool | None  # None: could not tell, or nothing to fix
    found: str
    then: str  # what genssd does about it, or what to change
    fatal: bool = False  # the run cannot work with this endpoint


Verdict = tuple[bool, str, str]  # ok, found, what genssd does about it


class Probe:
    def __init__(self, cfg: TeacherConfig, base_url: str):
        self.cfg = cfg
        self.base_url = base_url
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key(cfg), max_retries=1, timeout=cfg.timeout_s)

    async def complete(self, prompt: str, max_tokens: int, **options):
        return await self.client.completions.create(model=self.cfg.model, prompt=prompt, max_tokens=max_tokens,
                                                    **options)  # fmt: skip


async def diagnose(cfg: RunConfig, base_url: str, context: int | None) -> list[Finding]:
    probe = Probe(cfg.teacher, base_url)
    try:
        return await _findings(probe, cfg, context)
    finally:
        await probe.client.close()


async def _findings(probe: Probe, cfg: RunConfig, context: int | None) -> list[Finding]:
    teacher, out = cfg.teacher, []
    started = time.monotonic()
    try:
        models = await probe.client.models.list()
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        return [Finding("reachable", False, f"no ({error_class(exc)})", "check teacher.base_url and the server",
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
    problem = load_problems(cfg.data, 1)[0]
    prompt = render_prompt(load_prompt(cfg.prompts.teacher), problem.question)
    try:
        first = await probe.complete(prompt, 4, temperature=teacher.temperature, top_p=teacher.top_p,
                                     stop=teacher.stop or None, seed=teacher.seed)  # fmt: skip
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        out.append(Finding("completion", False, f"the run's first prompt was refused ({error_class(exc)})",
                           "genssd uses /v1/completions: the endpoint must serve it", fatal=True))  # fmt: skip
        return out
    prompt_tokens = first.usage.prompt_tokens if first.usage else None
    out.append(Finding("completion", True, f"/v1/completions answers ({prompt_tokens} prompt tokens)", ""))

    for name, check in (("n > 1 honoured", _n_honoured), ("seed honoured", _seed_honoured),
                        ("continues the prefix", _continues), ("stop strings honoured", _stops)):  # fmt: skip
        try:
            out.append(Finding(name, *await check(probe)))
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            out.append(Finding(name, False, f"the probe request failed ({error_class(exc)})", "see the server's log"))
        except (IndexError, TypeError, AttributeError):  # no choices, or no text in them
            out.append(Finding(name, False, "the answer had no usable choice", "see the server's log"))

    need = (prompt_tokens or 0) + cfg.search.max_new_tokens
    if context is None:
        out.append(Finding("context length", None, "not reported by the endpoint",
                           "a trajectory that outgrows it ends truncated, recorded as such"))  # fmt: skip
    else:
        fits = prompt_tokens is not None and need <= context
        out.append(Finding("context length", fits, f"{context} tokens; the first problem needs up to {need} "
                           f"({prompt_tokens} prompt + search.max_new_tokens {cfg.search.max_new_tokens})",
                           "" if fits else "lower search.max_new_tokens or serve a longer context"))  # fmt: skip
    return out


async def _n_honoured(probe: Probe) -> Verdict:
    got = len((await probe.complete("Once upon a time", 4, n=3, temperature=1.0, seed=1)).choices or [])
    return (got == 3, f"asked 3 choices, got {got}",
            "one request per step" if got == 3 else
            "asked once per candidate (seeds seed+i): same results, n times the requests")  # fmt: skip


async def _seed_honoured(probe: Probe) -> Verdict:
    texts = [(await probe.complete("Once upon a time", 8, temperature=1.0, seed=s)).choices[0].text for s in (7, 7, 8)]
    same, varies = texts[0] == texts[1], texts[0] != texts[2]
    found = ("same seed, same text; another seed, another" if same and varies else
             "same seed, same text, but another seed too: sampling looks off" if same else "same seed, other text")
    then = "" if same and varies else "resume still never asks twice (responses are logged); a fresh rerun differs"
    return same and varies, found, then  # fmt: skip


async def _continues(probe: Probe) -> Verdict:
    counted = (await probe.complete(COUNTING, 4, temperature=0.0)).choices[0].text
    continues = counted.lstrip().startswith("9")
    return (continues, f"{COUNTING!r} -> {counted!r}",
            "" if continues else "it restarts or ignores the text: Gen-SSD needs an endpoint that "
            "continues a partial trace (a base or completions-capable model)")  # fmt: skip


async def _stops(probe: Probe) -> Verdict:
    lines = (await probe.complete(LINES, 12, temperature=0.0, stop=["\n"])).choices[0].text
    stops = "\n" not in lines
    return (stops, f"stop ['\\n'] -> {lines!r}",
            "" if stops else "genssd cuts at teacher.stop itself; the tokens past it are still paid for")


def render(findings: list[Finding], base_url: str, model: str) -> Table:
    marks = {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]?[/]"}
    table = Table(title=f"genssd doctor: {model} at {base_url}")
    for column in ("check", "", "found", "genssd then"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(f.check, marks[f.ok], escape(f.found), escape(f.then))
    return table


def doctor_command(config_path: Path | None, overrides: list[str], console: Console) -> list[Finding]:
    import anyio

    from genssd_cli.launch import LocalServer, launched

    cfg = load_run_config(config_path, overrides)
    api_key(cfg.teacher)
    if cfg.teacher.launch is None:
        findings = anyio.run(diagnose, cfg, cfg.teacher.base_url, None)
        base_url = cfg.teacher.base_url
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            server = LocalServer(cfg.teacher.launch, cfg.teacher.model, Path(scratch) / "teacher-server.log")
            console.print(f"starting teacher server for {cfg.teacher.launch.gguf} …")
            with launched(server):
                server.wait_ready()
                base_url = server.base_url
                findings = anyio.run(diagnose, cfg, base_url, cfg.teacher.launch.n_ctx)
    console.print(render(findings, base_url, cfg.teacher.model))
    fatal = [f.check for f in findings if f.fatal]
    if fatal:
        raise RuntimeFailure(f"the teacher endpoint cannot serve a run: {', '.join(fatal)} failed")
    return findings
