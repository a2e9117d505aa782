"""Teacher endpoint probes: tiny requests (a few tokens each), sent the way a run sends its own
(raw completions, or a partial assistant message continued through the chat API), that show
what an endpoint really does. `genssd doctor` runs them all; `genssd run` runs the continuation
probe at start in chat-continue mode (`preflight`), and with `max_cost` a one-token request that
shows the bill can be counted (`usage_preflight`)."""

from __future__ import annotations

import time

import openai

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.teacher.endpoint import Endpoint, Prompt, Request, ShortResponse
from genssd_cli.teacher.pool import TeacherClient

# A model that continues the text completes "10"; one that starts a new answer does not. (Ending
# on a whole number is not enough: llama.cpp's chat API starts a new turn and still says "9".)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 1"
COUNT_ASK = "Count from 1 to 20, separated by commas."
LINES = "red\ngreen\nblue\nred\ngreen\nblue\nred\n"  # the next chunk crosses a newline
LINES_ASK = "Repeat red, green, blue, one per line, without end."
STORY, STORY_ASK = "Once upon a time", "Tell me a short story."


Verdict = tuple[bool, str, str]  # ok, found, what genssd does about it


def probe_prompt(teacher: TeacherConfig, ask: str, text: str) -> Prompt:
    """`text` to continue: raw in completions mode, the assistant's partial answer to `ask` in chat."""
    return Prompt("", text) if teacher.mode == "completions" else Prompt(ask, text)


async def n_honoured(endpoint: Endpoint) -> Verdict:
    story = Request(probe_prompt(endpoint.teacher, STORY_ASK, STORY), 3, 4, 1)
    try:
        answer = await endpoint.create(story, temperature=1.0)
    except openai.BadRequestError as exc:
        return (False, f"asked 3 choices: refused (400: {str(exc)[:80]})",
                "asked once per candidate (seeds seed+i): same results, n times the requests")  # fmt: skip
    got = len(answer.candidates)
    return (got == 3, f"asked 3 choices, got {got}",
            "one request per step" if got == 3 else
            "asked once per candidate (seeds seed+i): same results, n times the requests")  # fmt: skip


async def seed_honoured(endpoint: Endpoint) -> Verdict:
    prompt = probe_prompt(endpoint.teacher, STORY_ASK, STORY)
    texts = [(await endpoint.create(Request(prompt, 1, 8, s), temperature=1.0)).candidates[0].text for s in (7, 7, 8)]
    same, varies = texts[0] == texts[1], texts[0] != texts[2]
    found = ("same seed, same text; another seed, another" if same and varies else
             "same seed, same text, but another seed too: sampling looks off" if same else "same seed, other text")
    then = "" if same and varies else "resume still never asks twice (responses are logged); a fresh rerun differs"
    return same and varies, found, then  # fmt: skip


async def continues_verdict(endpoint: Endpoint) -> Verdict:
    teacher = endpoint.teacher
    counting = Request(probe_prompt(teacher, COUNT_ASK, COUNTING), 1, 4, 0)
    answer = await endpoint.create(counting, temperature=0.0, stop=[])
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


async def stops_honoured(endpoint: Endpoint) -> Verdict:
    prompt = probe_prompt(endpoint.teacher, LINES_ASK, LINES)
    lines = (await endpoint.create(Request(prompt, 1, 12, 0), temperature=0.0, stop=["\n"])).candidates[0].text
    stops = "\n" not in lines
    return (stops, f"stop ['\\n'] -> {lines!r}",
            "" if stops else "genssd cuts at teacher.stop itself; the tokens past it are still paid for")


# Sampler fields a server may apply by default that genssd does not set (teacher.extra_body can).
SAMPLER_FIELDS = ("repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                  "typical_p", "dry_multiplier", "xtc_probability", "mirostat")  # fmt: skip


def defaults_from_props(body: object) -> dict[str, object]:
    """llama.cpp's server (`GET /props`): its default generation settings, those under `params` in
    newer versions, at the top of `default_generation_settings` in older ones."""
    settings = body.get("default_generation_settings") if isinstance(body, dict) else None
    if not isinstance(settings, dict):
        return {}
    params = settings.get("params") if isinstance(settings.get("params"), dict) else settings
    return {k: params[k] for k in SAMPLER_FIELDS if k in params}


def defaults_from_openapi(body: object) -> dict[str, object]:
    """llama-cpp-python's server (FastAPI, `GET /openapi.json`): the defaults its completion request
    schema declares, which apply to every field a request leaves out."""
    schemas = body.get("components", {}).get("schemas", {}) if isinstance(body, dict) else {}
    fields = schemas.get("CreateCompletionRequest", {}).get("properties", {}) if isinstance(schemas, dict) else {}
    declared = {k: fields.get(k) for k in SAMPLER_FIELDS}
    return {k: v["default"] for k, v in declared.items() if isinstance(v, dict) and "default" in v}


async def sampler_defaults(endpoint: Endpoint) -> tuple[bool | None, str, str]:
    """What the server tells of the sampler defaults it applies to fields genssd leaves unset:
    llama.cpp's /props, else llama-cpp-python's /openapi.json; vLLM and hosted APIs tell none."""
    import httpx

    root = endpoint.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {endpoint.client.api_key}"}
    found, where = {}, ""
    async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
        for path, read in (("/props", defaults_from_props), ("/openapi.json", defaults_from_openapi)):
            try:
                response = await client.get(root + path)
                found = read(response.json()) if response.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                found = {}
            if found:
                where = path
                break
    pinned = endpoint.teacher.extra_body
    shown = ", ".join(f"{k} {v}" + (f" (pinned {pinned[k]})" if k in pinned else "") for k, v in found.items())
    if not found:
        return None, "unknown: the server tells none", "pin them with teacher.extra_body (e.g. repeat_penalty: 1.0)"
    unpinned = [k for k in ("repeat_penalty", "presence_penalty", "frequency_penalty")
                if k in found and k not in pinned and found[k] not in (0, 0.0, 1, 1.0)]  # fmt: skip
    then = (f"{', '.join(unpinned)} acts on the tokens of one request: a chunk restarts it, a whole sample "
            "does not; pin it with teacher.extra_body to compare methods fairly") if unpinned else ""  # fmt: skip
    return (not unpinned), f"{shown} ({where})", then


async def tokens_counted(endpoint: Endpoint, max_cost: float | None = None) -> Verdict:
    """How each candidate's tokens are counted, from a request of 3 choices as a step sends it
    (and what the earlier probes' replies showed: a bill missing, too small, or unchecked)."""
    story = Request(probe_prompt(endpoint.teacher, STORY_ASK, STORY), 3, 8, 2)
    answer = await endpoint.create(story, temperature=1.0)
    notes, tokenizer = endpoint.token_notes, endpoint.count_tokens is not None
    listed = sum(c.tokens for c in answer.candidates)
    if "missing" in notes:
        kept = "max_cost is refused" if max_cost is not None and not tokenizer else "the run warns"
        then = ("counted with the teacher's tokenizer" if tokenizer else
                f"prompt tokens and cost unknown (0), {kept}: set prompts.teacher_chat_template")  # fmt: skip
        return False, "no usage (token counts) in the replies", then
    if "underbilled" in notes:
        found = f"usage bills fewer tokens than the choices hold (about one choice of n; {listed} in these 3)"
        return None, found, f"each choice counted from its {answer.token_source}, and the cost from those counts"
    if answer.token_source == "split" or "unchecked" in notes:
        return (False, "no tokens listed per choice: a bill of several choices cannot be checked",
                "the bill is split evenly: teacher tokens, kept lengths and cost approximate (the run warns, "
                "summary.json and genssd report mark them); set prompts.teacher_chat_template, or serve "
                "logprobs")  # fmt: skip
    how = {"usage": "one choice per reply: its bill", "logprobs": "listed per choice (logprobs), adding up to the bill",
           "tokenizer": "the teacher's tokenizer (close, not exact)"}.get(answer.token_source or "", "")  # fmt: skip
    return answer.token_source != "tokenizer" or None, f"{listed} tokens in {len(answer.candidates)} choices: {how}", ""


async def usage_preflight(teacher: TeacherClient) -> None:
    """`genssd run` with max_cost: one 1-token request per reachable endpoint; a server that sends
    no usage, with no teacher tokenizer to count with, would make the cost 0 and max_cost
    meaningless: the run is refused before it spends anything."""
    now = time.monotonic()
    for endpoint in (e for e in teacher.endpoints if e.healthy(now)):
        request = Request(probe_prompt(endpoint.teacher, STORY_ASK, STORY), 1, 1, endpoint.teacher.seed)
        try:
            await endpoint.create(request, temperature=0.0)
        except (openai.APIError, ShortResponse):
            continue  # the run's own requests are retried and tell
        if "missing" in endpoint.token_notes and endpoint.count_tokens is None:
            raise UsageError(f"max_cost cannot be kept: teacher {endpoint.name} sends no usage (token counts) and "
                             "genssd has no teacher tokenizer to count with: set prompts.teacher_chat_template to "
                             "the teacher's tokenizer, or unset max_cost")  # fmt: skip


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
