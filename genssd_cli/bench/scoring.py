"""`genssd bench scoring`: the engine's prefix-cached scorer against a naive full recompute, same
model, same shapes, one process. Each prints one JSON line; then one line with the ratio.

The workload is the engine's in steady state: `trajectories` accepted prefixes of `prefix`
tokens; per step, `n` candidates of `chunk` tokens each; the lowest-PPL candidate is appended
and the next step scores `n` new ones. In a run, a prefix was built chunk by chunk by earlier
steps (each kept chunk's keys and values are those computed when it was scored), so the cached
scorer starts with the prefixes in its cache; building them is timed apart (`prefill_seconds`)
and not counted in candidate tokens/s. Token ids are random (no tokenizer needed, so
`--random-init` shapes work offline); speed does not depend on which ids they are.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from genssd_cli.bench import device_name, peak_memory_mb, ratio_line, synchronize
from genssd_cli.bench.models import load_bench_model, model_label

NAIVE_BATCH_TOKENS = 8192  # the naive scorer batches across trajectories, this many padded tokens a forward


@dataclass(frozen=True)
class ScoringBench:
    """`genssd bench scoring`'s flags."""

    model: str  # shipped name, HF id or folder
    random_init: str | None  # a config-only shape, e.g. qwen2.5-1.5b
    prefix: int  # prefix tokens per trajectory
    n: int  # candidates per step
    chunk: int  # tokens per candidate
    trajectories: int
    steps: int  # steps per trajectory
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int | None = None  # as student.batch_tokens


def bench_scoring(bench: ScoringBench) -> list[dict]:
    import torch

    from genssd_cli.methods import METHODS
    from genssd_cli.models import pick_device
    from genssd_cli.student.scorer import Step, StudentScorer, Tokenized, default_batch_tokens

    model, random_init, prefix, n, chunk = bench.model, bench.random_init, bench.prefix, bench.n, bench.chunk
    trajectories, steps = bench.trajectories, bench.steps
    device = pick_device(bench.device)
    lm, tokenizer = load_bench_model(model, random_init, device, bench.dtype, text=False)
    engine_batch_tokens = default_batch_tokens(device, bench.batch_tokens)  # what `genssd run` would use
    scorer = StudentScorer(lm, tokenizer, device, "{question}", engine_batch_tokens, cache_bytes=1 << 40)
    keep = METHODS["genssd"].select  # the engine's rule: the lowest PPL
    vocab = lm.config.get_text_config(decoder=True).vocab_size
    rng = random.Random(0)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(count)]

    prefixes = [tokens(prefix) for _ in range(trajectories)]
    candidates = [[[tokens(chunk) for _ in range(n)] for _ in range(trajectories)] for _ in range(steps)]

    def naive() -> None:
        contexts = [list(p) for p in prefixes]
        for step in range(steps):
            sequences = [Tokenized(c + cand, len(c)) for t, c in enumerate(contexts) for cand in candidates[step][t]]
            totals = scorer.sequence_nll(sequences)
            for t, context in enumerate(contexts):
                # Candidates of one length: the lowest total NLL is the lowest PPL.
                context.extend(candidates[step][t][keep(totals[t * n : (t + 1) * n])])

    def prefill() -> None:
        for t, context in enumerate(prefixes):
            scorer.prefill(("bench", t), context[:-1])  # the last token is fed again with the candidates

    def cached() -> None:
        contexts = [list(p) for p in prefixes]
        for step in range(steps):  # every trajectory's step in one call, as the scoring queue batches
            batch = [
                Step(("bench", t), context, [Tokenized(context + c, len(context)) for c in candidates[step][t]], keep)
                for t, context in enumerate(contexts)
            ]
            for t, scores in enumerate(scorer.score_steps(batch)):
                contexts[t].extend(candidates[step][t][keep([s.ppl for s in scores])])
        for t in range(trajectories):
            scorer.forget(("bench", t))

    scorer.sequence_nll([Tokenized(tokens(32), 16)])  # first-call costs (allocator, kernels) outside the timings
    results = []
    prefill_started = time.perf_counter()
    prefill()
    prefill_seconds = time.perf_counter() - prefill_started
    for method, work, budget in (("naive", naive, NAIVE_BATCH_TOKENS), ("prefix_cache", cached, engine_batch_tokens)):
        scorer.batch_tokens = budget
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before_tokens = scorer.forward_tokens
        started = time.perf_counter()
        work()
        synchronize(device)
        seconds = time.perf_counter() - started
        scored = steps * trajectories * n * chunk
        results.append({
            "bench": "scoring", "method": method, "model": model_label(model, random_init),
            "device": device_name(device), "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
            "prefix": prefix, "n": n, "chunk": chunk, "trajectories": trajectories, "steps": steps,
            "candidate_tokens": scored, "seconds": round(seconds, 3),
            "candidate_tokens_per_s": round(scored / seconds, 1),
            "forward_tokens": scorer.forward_tokens - before_tokens,
            "peak_memory_mb": peak_memory_mb(device),
            "threads": torch.get_num_threads(), "batch_tokens": budget,
        })  # fmt: skip
    naive_line, cached_line = results
    cached_line["peak_cache_mb"] = scorer.peak_cache_mb
    cached_line["prefill_seconds"] = round(prefill_seconds, 3)
    return [naive_line, cached_line, ratio_line("scoring", cached_line, naive_line, "candidate_tokens_per_s", 2)]
