"""Teacher endpoint probes: tiny requests (a few tokens each), sent the way a run sends its own
(raw completions, or a partial assistant message continued through the chat API), that show
what an endpoint really does. `genssd doctor` runs them all; `genssd run` runs the continuation
probe at start in chat-continue mode (`preflight`)."""

from __future__ import annotations

import time

import openai

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import RuntimeFailure
from genssd_cli.teacher.endpoint import Endpoint, Prompt, Request
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
