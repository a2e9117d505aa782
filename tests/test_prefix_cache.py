"""The prefix-cached scorer against the naive full recompute, on the real demo student in fp32:
equal within 1e-4 relative across steps, tokenization seams, padding, re-samples and eviction."""

import math
import random

import pytest

from genssd_cli.config import StudentConfig
from genssd_cli.kv_cache import PrefixCache, PrefixEntry
from genssd_cli.methods import METHODS
from genssd_cli.student import ScoreRequest, StudentScorer

SELECT = METHODS["genssd"].select  # the engine's rule for Gen-SSD steps


@pytest.fixture(scope="module")
def scorer():
    scorer = StudentScorer.load(StudentConfig(model="smollm2-135m-instruct", device="cpu", cache_mb=512), "{question}")
    assert scorer.cache is not None
    return scorer


def close(cached, naive) -> None:
    assert [s.tokens for s in cached] == [s.tokens for s in naive]
    for c, n in zip(cached, naive, strict=True):
        assert (math.isinf(c.ppl) and math.isinf(n.ppl)) or c.ppl == pytest.approx(n.ppl, rel=1e-4)


def walk(scorer: StudentScorer, key, prompt: str, steps: list[list[str]]) -> int:
    """Score step after step as the engine does (accepting the lowest PPL), checking each step."""
    context = prompt
    for candidates in steps:
        request = ScoreRequest(context, candidates, key=key, keep=SELECT)
        cached = scorer.score([request])[0]
        close(cached, scorer.score_naive([request])[0])
        context += candidates[SELECT([s.ppl for s in cached])]
    return len(steps)


# Chunks cut mid-word and mid-number, so that context+chunk tokenizes differently at the seam.
SEAMS = [
    [" Tom has 3 bags of 5 app", " Tom buys twelve", " First, 3 * 5 = 1", " 3 x 5"],
    ["les, so 15 apples", "les. He eats", "5 apples in total.", " = 15."],
    [" The answer is 15.", "", " 15", "\n\nThe answer"],
    ["0 apples remain", " apples!", "x", " so he has"],
]


def test_cached_equals_naive_across_seams_and_padding(scorer):
    prompt = scorer.prompt_text("Tom has 3 bags of 5 apples. How many apples?")
    assert walk(scorer, "seams", prompt, SEAMS) == 4
    assert scorer.cache.get("seams") is not None


def test_resample_at_the_same_step_and_forget(scorer):
    prompt = scorer.prompt_text("What is 7 times 6?")
    request = ScoreRequest(prompt + " 7 times 6", [" is 42.", " = 4", " equals forty-two"], key="again", keep=SELECT)
    first = scorer.score([request])[0]
    again = scorer.score([ScoreRequest(request.context, [" makes 42", " = 42"], key="again", keep=SELECT)])[0]
    close(again, scorer.score_naive([ScoreRequest(request.context, [" makes 42", " = 42"])])[0])
    close(first, scorer.score_naive([request])[0])
    scorer.forget("again")
    assert scorer.cache.get("again") is None


def test_many_trajectories_with_eviction_are_exact(scorer):
    rng = random.Random(7)
    words = ["the", "apples", "cost", "3", "dollars", "and", "12", "so", "total", "is", "45", "minus", "6"]
    small = PrefixCache(budget_bytes=4 * 2**20)  # about two trajectories' prefixes
    scorer.cache, big = small, scorer.cache
    contexts = {t: scorer.prompt_text(f"Problem {t}: how many?") for t in range(5)}
    try:
        for _step in range(3):
            for t in range(5):  # interleaved, as in a run: the LRU evicts, later steps rebuild
                candidates = [" " + " ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(3)]
                request = ScoreRequest(contexts[t], candidates, key=("t", t), keep=SELECT)
                cached = scorer.score([request])[0]
                close(cached, scorer.score_naive([request])[0])
                contexts[t] += candidates[SELECT([s.ppl for s in cached])]
        assert small.evictions > 0 and small.bytes <= small.budget_bytes
    finally:
        scorer.cache = big


@pytest.mark.parametrize("batch_tokens", [8192, 200])  # one forward for all, or several
def test_trajectories_batched_together_are_exact(scorer, batch_tokens):
    """Different prefix lengths (left padding), candidate lengths (right padding), a seam, a
    trajectory seen for the first time, and steps that continue cached ones, in one call."""
    rng = random.Random(batch_tokens)
    words = ["apples", "cost", "3", "dollars", "and", "12", "so", "total", "is", "45", "app", "les"]
    contexts = {t: scorer.prompt_text(f"Problem {t}: " + "how many? " * t) for t in range(4)}
    scorer.batch_tokens, saved = batch_tokens, scorer.batch_tokens
    try:
        for step in range(3):
            live = range(4) if step else range(2)  # trajectories 2 and 3 join at step 1
            requests = [
                ScoreRequest(contexts[t], ["".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(3)],
                             key=("batched", batch_tokens, t), keep=SELECT)
                for t in live
            ]  # fmt: skip
            cached = scorer.score(requests)
            for request, scores in zip(requests, cached, strict=True):
                close(scores, scorer.score_naive([request])[0])
                contexts[request.key[2]] += request.candidates[SELECT([s.ppl for s in scores])]
    finally:
        scorer.batch_tokens = saved


def test_the_cache_kept_is_the_candidate_the_rule_chose(scorer):
    """The scorer does not choose: it keeps the prefix of whichever candidate the method's rule picks."""
    prompt = scorer.prompt_text("What is 2 + 2?")
    candidates = [" 2 + 2 = 4.", " Two plus two makes four, so", " The answer is 4."]
    for name, rule in (("lowest", SELECT), ("highest", lambda ppls: max(range(len(ppls)), key=ppls.__getitem__))):
        scores = scorer.score([ScoreRequest(prompt, candidates, key=name, keep=rule)])[0]
        chosen = rule([s.ppl for s in scores])
        entry = scorer.cache.get(name)
        assert entry.ids == scorer._encode(prompt + candidates[chosen])
        scorer.forget(name)
    with pytest.raises(ValueError, match="selection rule"):
        ScoreRequest(prompt, candidates, key="no rule")


def test_cache_saves_forward_tokens(scorer):
    prompt = scorer.prompt_text("A long problem. " * 40)
    steps = [[" " + "word " * 8, " " + "other " * 6, " " + "x " * 7] for _ in range(4)]
    before = scorer.forward_tokens
    walk(scorer, "count", prompt, steps)  # each step also runs the naive scorer
    both = scorer.forward_tokens - before
    scorer.forget("count")
    before = scorer.forward_tokens
    context = prompt
    for candidates in steps:
        scores = scorer.score([ScoreRequest(context, candidates, key="count", keep=SELECT)])[0]
        context += candidates[SELECT([s.ppl for s in scores])]
    cached_only = scorer.forward_tokens - before
    assert cached_only * 3 < both - cached_only  # the naive path ran > 3x the tokens


def test_lru_budget_and_order():
    class Blob:
        def __init__(self, n):
            self.nbytes = n

    cache = PrefixCache(budget_bytes=100)
    for key in "abc":
        cache.put(key, PrefixEntry([1], [(Blob(20), Blob(20))]))
    assert len(cache) == 2 and cache.get("a") is None and cache.evictions == 1
    cache.get("b")  # b is now the most recent: c goes first
    cache.put("d", PrefixEntry([1], [(Blob(20), Blob(20))]))
    assert cache.get("c") is None and cache.get("b") is not None
    cache.put("huge", PrefixEntry([1], [(Blob(80), Blob(80))]))  # over the whole budget: not kept
    assert cache.get("huge") is None and cache.peak_bytes == 80
