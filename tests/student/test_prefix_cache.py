"""The prefix-cached scorer against an independent reference, on the real demo student in fp32:
equal within 1e-4 relative across steps, tokenization seams, padding, re-samples and eviction.

The reference shares nothing with student.py but the model and its tokenizer: it tokenizes
context and context+candidate itself, takes the candidate's tokens past their longest common
token prefix (the definition in student.py's docstring), runs one unpadded batch-1 forward with no
cache, and computes PPL = exp(mean NLL of those tokens) from the logits in float64."""

import math
import random
from dataclasses import dataclass

import pytest
import torch

from genssd_cli.config import StudentConfig
from genssd_cli.methods import METHODS
from genssd_cli.student.kv_cache import PrefixCache, PrefixEntry
from genssd_cli.student.scorer import Score, ScoreRequest, StudentScorer

SELECT = METHODS["genssd"].select  # the engine's rule for Gen-SSD steps


@pytest.fixture(scope="module")
def scorer():
    scorer = StudentScorer.load(StudentConfig(model="smollm2-135m-instruct", device="cpu", cache_mb=512), "{question}")
    assert scorer.cache is not None
    return scorer


def encode(scorer: StudentScorer, text: str) -> list[int]:
    # The chat template already holds the special tokens: nothing is added (a BOS would shift every position).
    return scorer.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Reference:
    ppl: float
    tokens: int  # the candidate's own tokens
    merged: int  # context tokens re-tokenized with the candidate: > 0 when a token merges across the seam


def reference(scorer: StudentScorer, context: str, candidate: str) -> Reference:
    ctx, full = encode(scorer, context), encode(scorer, context + candidate)
    first = 0  # the candidate's first own token: past the longest common token prefix
    while first < min(len(ctx), len(full)) and ctx[first] == full[first]:
        first += 1
    assert first >= 1  # the chat template is always there to predict the candidate's first token
    own = len(full) - first
    if own == 0:
        return Reference(math.inf, 0, len(ctx) - first)
    with torch.inference_mode():
        logits = scorer.model(input_ids=torch.tensor([full], device=scorer.device), use_cache=False).logits[0]
    logprobs = torch.log_softmax(logits[first - 1 : -1].double(), dim=-1)  # position j-1 predicts token j
    nll = -sum(float(logprobs[j - first, full[j]]) for j in range(first, len(full)))
    return Reference(math.exp(nll / own), own, len(ctx) - first)


def check(scorer: StudentScorer, request: ScoreRequest, scores: list[Score]) -> list[Reference]:
    """The scores of one request equal the reference's, candidate by candidate."""
    refs = [reference(scorer, request.context, c) for c in request.candidates]
    assert [s.tokens for s in scores] == [r.tokens for r in refs]
    for s, r in zip(scores, refs, strict=True):
        assert (math.isinf(s.ppl) and math.isinf(r.ppl)) or s.ppl == pytest.approx(r.ppl, rel=1e-4)
    return refs


def keep_first(ppls) -> int:
    return 0  # a selection rule that fixes the path, so that each step continues the chunk cut mid-word


def walk(scorer: StudentScorer, key, prompt: str, steps: list[list[str]], keep) -> list[list[Reference]]:
    """Score step after step as the engine does (keeping the rule's pick), checking each step."""
    context, refs = prompt, []
    for candidates in steps:
        request = ScoreRequest(context, candidates, key=key, keep=keep)
        cached = scorer.score([request])[0]
        refs.append(check(scorer, request, cached))
        context += candidates[keep([s.ppl for s in cached])]
    return refs


# Each step's first chunk ends mid-word, and the next step's chunks mostly continue the word, so that
# context+chunk re-tokenizes the context's tail: "\n"+"\n\n" re-splits the chat template's last token,
# " app"+"les" merges one token back, " multiplicat"+"ion" and " approximatel"+"y" three (into the
# prefix the cache holds). Candidates that do not merge, and an empty one, share each step.
SEAMS = [
    ["\n\nTom has 3 bags of 5 app", " Tom buys twelve", " 3 x 5", " Tom"],
    ["les, so by multiplicat", "roximately 15", "les. He eats", " = 15."],
    ["ion 3 * 5 = 15. So approximatel", "ions", "", " 15"],
    ["y 15 apples remain", "y.", "x", " so he has"],
]


def test_cached_equals_reference_across_seams(scorer):
    prompt = scorer.prompt_text("Tom has 3 bags of 5 apples. How many apples?")
    refs = walk(scorer, "seams", prompt, SEAMS, keep_first)
    assert scorer.cache.get("seams") is not None
    # The seams this test is about did happen (context tokens re-tokenized per candidate)...
    assert [[r.merged for r in step] for step in refs] == [[1, 0, 0, 0], [1, 1, 1, 0], [3, 2, 0, 0], [3, 3, 0, 0]]
    assert refs[2][2].tokens == 0  # ...and the empty candidate has no tokens (PPL inf on both sides)
    scorer.forget("seams")


def test_resample_at_the_same_step_and_forget(scorer):
    """The first sample keeps a candidate that re-tokenized the context's last three tokens; a
    re-sample at the same step must roll the cached prefix back past them and recompute them."""
    context = scorer.prompt_text("What is 7 times 6?") + " Tom finds it by multiplicat"
    request = ScoreRequest(context, ["ion, 42.", " 6 times 7", "ive"], key="again", keep=keep_first)
    first = check(scorer, request, scorer.score([request])[0])
    assert [r.merged for r in first] == [3, 0, 1]
    for again in ([" 6 times 7", "\n"], ["ive", "ion: 42", " 6 * 7 = 42"]):
        resample = ScoreRequest(context, again, key="again", keep=keep_first)
        check(scorer, resample, scorer.score([resample])[0])
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
                check(scorer, request, cached)
                contexts[t] += candidates[SELECT([s.ppl for s in cached])]
        assert small.evictions > 0 and small.bytes <= small.budget_bytes
    finally:
        scorer.cache = big


@pytest.mark.parametrize("batch_tokens", [8192, 200])  # one forward for all, or several
def test_trajectories_batched_together_are_exact(scorer, batch_tokens):
    """Different prefix lengths (left padding), candidate lengths (right padding), seams, a
    trajectory seen for the first time, and steps that continue cached ones, in one call. The
    naive path (what a run with cache_mb: 0 uses), batched over the same requests, is checked too."""
    rng = random.Random(batch_tokens)
    words = ["apples", "cost", "3", "dollars", "and", "12", "so", "total", "is", "45", "app", "les"]

    def chunk() -> str:  # ends mid-word; the next step's chunk may continue the word (a seam) or not
        return rng.choice(["les", "roximately", " so"]) + "".join(rng.choices(words, k=rng.randint(1, 6))) + " app"

    contexts = {t: scorer.prompt_text(f"Problem {t}: " + "how many? " * t) for t in range(4)}
    scorer.batch_tokens, saved = batch_tokens, scorer.batch_tokens
    merged = 0
    try:
        for step in range(3):
            live = range(4) if step else range(2)  # trajectories 2 and 3 join at step 1
            requests = [
                ScoreRequest(contexts[t], [chunk() for _ in range(3)], key=("batched", batch_tokens, t), keep=SELECT)
                for t in live
            ]
            cached = scorer.score(requests)
            naive = scorer.score_naive(requests)
            for request, scores, plain in zip(requests, cached, naive, strict=True):
                refs = check(scorer, request, scores)
                assert [s.tokens for s in plain] == [r.tokens for r in refs]
                assert [s.ppl for s in plain] == pytest.approx([r.ppl for r in refs], rel=1e-4)
                merged += sum(r.merged > 0 for r in refs)
                contexts[request.key[2]] += request.candidates[SELECT([s.ppl for s in scores])]
        assert merged >= 4  # candidates merged across their seams
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
        assert entry.ids == encode(scorer, prompt + candidates[chosen])
        scorer.forget(name)
    with pytest.raises(ValueError, match="selection rule"):
        ScoreRequest(prompt, candidates, key="no rule")


def test_cache_saves_forward_tokens(scorer):
    prompt = scorer.prompt_text("A long problem. " * 40)
    steps = [[" " + "word " * 8, " " + "other " * 6, " " + "x " * 7] for _ in range(4)]
    context, cached_tokens, naive_tokens = prompt, 0, 0
    for candidates in steps:
        request = ScoreRequest(context, candidates, key="count", keep=SELECT)
        before = scorer.forward_tokens
        scores = scorer.score([request])[0]
        cached_tokens += scorer.forward_tokens - before
        before = scorer.forward_tokens
        scorer.score_naive([request])
        naive_tokens += scorer.forward_tokens - before
        context += candidates[SELECT([s.ppl for s in scores])]
    scorer.forget("count")
    assert cached_tokens * 3 < naive_tokens  # the naive path ran > 3x the tokens


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
