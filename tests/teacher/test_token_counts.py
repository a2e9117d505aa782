"""Token counts that add up, or say they are approximate: a server that bills one choice of n is
counted from what it lists per choice; a bill nothing can check is split and warned about once;
a reply without usage (or with counts that are no counts) is counted from the logprobs or the
teacher's tokenizer, and `max_cost` is refused before spending when it cannot be counted at all.
Against the test teacher process (genssd_cli/teacher/servers/test_teacher.py) and in-process."""

import anyio
import openai
import pytest
from conftest import collect

from genssd_cli.config import TeacherConfig
from genssd_cli.errors import UsageError
from genssd_cli.teacher.pool import TeacherClient
from genssd_cli.teacher.probes import usage_preflight
from genssd_cli.teacher.servers.test_teacher import continuation
from genssd_cli.teacher.token_counts import listed_tokens, per_choice_tokens, usage_count

PROMPT, STOP = "Q: 5-2?\nA:", ["\nQuestion:"]


def words(text: str) -> int:  # a stand-in tokenizer: the test teacher's tokens are words
    return len(text.split())


def client(url: str, count_tokens=None, **kw) -> tuple[TeacherClient, list[str]]:
    """A pool whose warnings are collected."""
    teacher = TeacherClient(TeacherConfig(model="fake-teacher", base_url=url, stop=STOP, **kw), url,
                            backoff_s=0.01, count_tokens=count_tokens)  # fmt: skip
    warnings: list[str] = []
    teacher.warn = warnings.append
    return teacher, warnings


def ask(teacher: TeacherClient, seeds, n: int = 4):
    async def go():
        try:
            return [await collect(teacher, PROMPT, n, 12, seed) for seed in seeds]
        finally:
            await teacher.aclose()

    return anyio.run(go)


def generated(seed: int, n: int = 4) -> list[int]:
    """What the test teacher generated for each choice (seed + i)."""
    return [continuation(PROMPT, seed + i, 12, STOP)[2] for i in range(n)]


def test_a_server_that_bills_one_choice_is_counted_from_its_logprobs(fake_teacher):
    """llama.cpp's llama-server bills about one choice of n: each candidate's count is what the
    server listed for it (not a share of the small bill), the reply's total is their sum (so the
    cost too), and the run is told once."""
    server = fake_teacher("--bill-one-choice")
    teacher, warnings = client(server.base_url)
    for seed, (candidates, [part]) in zip((1, 2, 3), ask(teacher, (1, 2, 3)), strict=True):
        assert [c.tokens for c in candidates] == generated(seed)
        assert part.completion_tokens == sum(generated(seed)) and part.token_source == "logprobs"
    assert teacher.completion_tokens == sum(sum(generated(s)) for s in (1, 2, 3))
    assert len(warnings) == 1 and "bills fewer completion tokens than its choices hold" in warnings[0]


def test_a_bill_nothing_can_check_is_split_and_warned_about_once(fake_teacher):
    """No logprobs and no tokenizer: the bill is split evenly (all genssd can do), and one
    warning says the figures are approximate."""
    server = fake_teacher("--bill-one-choice", "--no-logprobs")
    teacher, warnings = client(server.base_url)
    replies = ask(teacher, (1, 2))
    assert {part.token_source for _, [part] in replies} == {"split"}
    assert len(warnings) == 1 and "approximate" in warnings[0] and "split evenly" in warnings[0]


def test_the_teacher_tokenizer_finds_a_one_choice_bill_too(fake_teacher):
    server = fake_teacher("--bill-one-choice", "--no-logprobs")
    teacher, warnings = client(server.base_url, count_tokens=words)
    [(candidates, [part])] = ask(teacher, (5,))
    assert part.token_source == "tokenizer"
    assert part.completion_tokens == sum(c.tokens for c in candidates) > 2 * generated(5)[0]
    assert len(warnings) == 1 and "counts each choice from the tokenizer" in warnings[0]


def test_without_usage_choices_are_counted_from_their_logprobs(fake_teacher):
    """No usage at all: n choices are counted from their logprobs (not 0), and the run is told
    once that prompt tokens and cost are unknown."""
    server = fake_teacher("--no-usage")
    teacher, warnings = client(server.base_url)
    [(candidates, [part])] = ask(teacher, (7,))
    assert part.token_source == "logprobs" and [c.tokens for c in candidates] == generated(7)
    assert part.completion_tokens == sum(generated(7)) and part.prompt_tokens == 0
    assert len(warnings) == 1 and "sends no usage" in warnings[0] and "unknown" in warnings[0]


def test_without_usage_one_choice_is_counted_after_the_first_reply(fake_teacher):
    server = fake_teacher("--no-usage")
    teacher, _ = client(server.base_url)
    first, second = ask(teacher, (3, 4), n=1)
    assert first[1][0].token_source == "none" and first[0][0].tokens == 0  # nothing asked, nothing known
    # The test teacher lists tokens only when asked: the second request asked.
    assert second[1][0].token_source == "logprobs" and second[0][0].tokens == generated(4, 1)[0]


def test_without_usage_the_teacher_tokenizer_counts_prompt_and_choices(fake_teacher):
    server = fake_teacher("--no-usage", "--no-logprobs")
    teacher, warnings = client(server.base_url, count_tokens=words)
    [(candidates, [part])] = ask(teacher, (2,))
    assert part.token_source == "tokenizer" and part.prompt_tokens == words(PROMPT) > 0
    assert part.completion_tokens == sum(words(c.text) for c in candidates) > 0
    assert len(warnings) == 1 and "counts them with the teacher's tokenizer" in warnings[0]


def test_max_cost_is_refused_before_spending_when_nothing_can_count(fake_teacher):
    """`genssd run` with max_cost sends one 1-token request per endpoint first: no usage and no
    teacher tokenizer refuses the run in one line; usage, or a tokenizer, lets it go on."""
    no_usage, billing = fake_teacher("--no-usage"), fake_teacher()

    def preflight(url: str, count_tokens=None) -> None:
        teacher, _ = client(url, count_tokens=count_tokens)

        async def go():
            try:
                await usage_preflight(teacher)
            finally:
                await teacher.aclose()

        anyio.run(go)

    with pytest.raises(UsageError, match=r"max_cost cannot be kept: teacher 127\.0\.0\.1:\d+ sends no usage"):
        preflight(no_usage.base_url)
    preflight(no_usage.base_url, words)
    preflight(billing.base_url)
    assert [r["max_tokens"] for r in no_usage.requests() + billing.requests()] == [1, 1, 1]


@pytest.mark.parametrize("value", [None, -3, 2.5, "7", True, [1]])
def test_a_usage_count_that_is_no_count_is_missing(value):
    class Usage:
        completion_tokens = value

    assert usage_count(Usage(), "completion_tokens") is None
    assert usage_count(None, "completion_tokens") is None


def test_per_choice_counts_without_a_bill_and_under_one():
    assert per_choice_tokens(None, [3, 4], ["a", "b"], None) == ([3, 4], "logprobs", 7, "missing")
    assert per_choice_tokens(None, [None], ["a b c"], words) == ([3], "tokenizer", 3, "missing")
    assert per_choice_tokens(None, [None, None], ["a", "b"], None) == ([0, 0], "none", 0, "missing")
    assert per_choice_tokens(5, [5, 6, 4, 5], list("abcd"), None) == ([5, 6, 4, 5], "logprobs", 20, "underbilled")
    # A bill near the lists (an end token counted or not) is not one choice's: split, as before.
    assert per_choice_tokens(19, [5, 6, 4, 5], list("abcd"), None)[1:] == ("split", 19, "unchecked")
    assert per_choice_tokens(8, [None, None], ["a", "b"], None) == ([4, 4], "split", 8, "unchecked")


def test_llama_server_lists_completion_tokens_under_content():
    """llama.cpp's llama-server answers /v1/completions logprobs as `{"content": [...]}` (the chat
    shape), not OpenAI's `tokens`: both are counted."""
    choice = openai.types.Completion.model_validate({
        "id": "x", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": " a b", "finish_reason": "length",
                     "logprobs": {"content": [{"id": 1, "token": " a", "logprob": -1.0},
                                              {"id": 2, "token": " b", "logprob": -1.0}]}}],
    }).choices[0]  # fmt: skip
    assert listed_tokens(choice.logprobs) == 2
    assert listed_tokens(None) is None
