"""The student side: perplexity of each teacher candidate under the student, given the problem
(rendered with the student's chat template) and the accepted prefix.

PPL(candidate) = exp(mean NLL of the candidate's tokens). Chunk boundaries cut words, so the
context and context+candidate are tokenized separately and the candidate's tokens are those past
their longest common token prefix: a token that merges across the seam counts as the
candidate's.

Two paths give the same numbers (within float rounding, tested): `score_naive` recomputes whole
sequences and is the reference; a request that names its trajectory (`key`) reuses that
trajectory's prefix KV cache (kv_cache.py), so a step computes only its candidates' tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import anyio

from genssd_cli.data import render_prompt
from genssd_cli.kv_cache import (
    PrefixCache,
    PrefixEntry,
    cache_argument,
    expand_kv,
    from_cache,
    output_cache,
    slice_kv,
    supports_prefix_cache,
    to_cache,
)


@dataclass(frozen=True)
class ScoreRequest:
    context: str  # student prompt + accepted prefix
    candidates: list[str]
    key: Any = None  # the trajectory, whose prefix cache may be used; None: score from scratch


@dataclass(frozen=True)
class Score:
    ppl: float  # inf when the candidate has no tokens of its own
    tokens: int


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def lowest_ppl(scores: list[Score]) -> int:
    """The selection rule: the candidate the student finds easiest (first one on ties)."""
    return min(range(len(scores)), key=lambda i: scores[i].ppl)


class StudentScorer:
    def __init__(
        self,
        model,
        tokenizer,
        device: str,
        user_template: str,
        batch_tokens: int = 8192,
        cache_bytes: int = 0,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.user_template = user_template
        self.batch_tokens = batch_tokens
        usable = cache_bytes > 0 and supports_prefix_cache(model.config)
        self.cache = PrefixCache(cache_bytes) if usable else None
        self._cache_arg = cache_argument(model) if usable else None
        self.forward_tokens = 0  # tokens run through the model (what the cache saves)

    @classmethod
    def load(cls, cfg, user_template: str) -> StudentScorer:
        from genssd_cli.models import load_causal_lm, pick_device

        device = pick_device(cfg.device)
        model, tokenizer = load_causal_lm(cfg.model, cfg.gguf_file, cfg.adapter, device, cfg.dtype)
        return cls(model, tokenizer, device, user_template, cfg.batch_tokens, cfg.cache_mb * 2**20)

    def user_message(self, question: str) -> str:
        return render_prompt(self.user_template, question)

    def prompt_text(self, question: str) -> str:
        """The student-side prompt: its own chat template with the generation prompt opened."""
        message = self.user_message(question)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        return message + "\n"

    def _encode(self, text: str) -> list[int]:
        # The chat template already holds the special tokens.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def forget(self, key: Any) -> None:
        """The trajectory ended: its cache is no longer worth memory."""
        if self.cache is not None:
            self.cache.drop(key)

    def score(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        results: list[list[Score] | None] = [None] * len(requests)
        naive = [i for i, r in enumerate(requests) if r.key is None or self.cache is None]
        for i, request in enumerate(requests):
            if results[i] is None and i not in naive:
                results[i] = self.score_ids_cached(request.key, *self._tokenize(request))
        for i, scores in zip(naive, self.score_naive([requests[i] for i in naive]), strict=True):
            results[i] = scores
        return results

    def _tokenize(self, request: ScoreRequest) -> tuple[list[int], list[tuple[list[int], int]]]:
        """Context ids, and per candidate (ids of context+candidate, index of its first own token)."""
        context = self._encode(request.context)
        sequences = []
        for text in request.candidates:
            full = self._encode(request.context + text)
            sequences.append((full, max(common_prefix_len(context, full), 1)))
        return context, sequences

    def score_ids_cached(self, key: Any, context: list[int], sequences: list[tuple[list[int], int]]) -> list[Score]:
        """Token-level cached scoring: `sequences` are (context+candidate ids, first own token)."""
        import torch

        # Positions shared by every sequence, less one: that token is fed again with each
        # candidate so that its logits score the candidate's first token.
        shared = min(start for _, start in sequences) - 1
        entry = self.cache.get(key)
        reused = common_prefix_len(entry.ids, context[:shared]) if entry else 0
        kv = slice_kv(entry.kv, 0, reused) if reused else None
        rows = [full[shared:] for full, _ in sequences]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, row in enumerate(rows):  # right padding: a real token never sees the pads after it
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, shared : shared + len(row)] = 1
        positions = torch.arange(shared, shared + width).expand(len(rows), -1)
        with torch.inference_mode():
            if reused < shared:  # new tokens of the accepted prefix (or all of it after an eviction)
                kv = self._extend(kv, context[reused:shared], reused)
            past = to_cache(expand_kv(kv, len(rows)) if kv else None)
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **{self._cache_arg: past},
            )
            self.forward_tokens += ids.numel()
            scores = []
            for r, (full, start) in enumerate(sequences):
                count = len(full) - start
                if count == 0:
                    scores.append(Score(math.inf, 0))
                    continue
                first = start - shared - 1  # logits at row index k predict the token after it
                logprobs = torch.log_softmax(out.logits[r, first : first + count].float(), dim=-1)
                targets = torch.tensor(full[start:], device=logprobs.device)
                nll = -float(logprobs.gather(-1, targets[:, None]).sum())
                scores.append(Score(math.exp(nll / count), count))
            # Keep the candidate the engine will accept (same rule): next step's prefix.
            best = lowest_ppl(scores)
            kept = sequences[best][0]
            best_kv = [(k.clone(), v.clone()) for k, v in slice_kv(from_cache(output_cache(out)), best, len(kept))]
        self.cache.put(key, PrefixEntry(kept, best_kv))
        return scores

    def _extend(self, kv, tokens: list[int], offset: int):
        import torch

        ids = torch.tensor([tokens], device=self.device)
        positions = torch.arange(offset, offset + len(tokens), device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_arg: to_cache(kv)})
        self.forward_tokens += len(tokens)
        return from_cache(output_cache(out))

    def score_naive(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        sequences: list[tuple[list[int], int]] = []
        for request in requests:
            sequences.extend(self._tokenize(request)[1])
        nll = self.sequence_nll(sequences)
        scores: list[Score] = []
        for (ids, start), total in zip(sequences, nll, strict=True):
            count = len(ids) - start
            scores.append(Score(math.exp(total / count) if count else math.inf, count))
        out, i = [], 0
        for request in requests:
            out.append(scores[i : i + len(request.candidates)])
            i += len(request.candidates)
        return out

    def sequence_nll(self, sequences: list[tuple[list[int], int]]) -> list[float]:
        """Summed NLL of tokens[start:] per sequence, in padded batches under the token budget."""
        import torch

        totals = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        batch: list[int] = []
        for index in order:
            width = len(sequences[batch[0]][0]) if batch else len(sequences[index][0])
            if batch and (len(batch) + 1) * width > self.batch_tokens:
                self._nll_batch(sequences, batch, totals, torch)
                batch = []
            batch.append(index)
        if batch:
            self._nll_batch(sequences, batch, totals, torch)
        return totals

    def _nll_batch(self, sequences, batch: list[int], totals: list[float], torch) -> None:
        pad = self.tokenizer.pad_token_id
        width = max(len(sequences[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = sequences[i][0]
            ids[row, width - len(seq) :] = torch.tensor(seq)  # left padding: targets end aligned
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(sequences[i][0]) - sequences[i][1] for i in batch) + 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=keep,
                use_cache=False,
            ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(batch):
            seq, start = sequences[i]
            count = len(seq) - start
            if count == 0:
                continue
            # logits index j is absolute position width-keep+j and predicts the token after it.
            first = keep - 1 - count
            targets = torch.tensor(seq[start:], device=logprobs.device)
            picked = logprobs[row, first : first + count].gather(-1, targets[:, None])
            totals[i] = -float(picked.sum())
        self.forward_tokens += ids.numel()


@dataclass
class _Pending:
    request: ScoreRequest
    solo: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    result: list[Score] | None = None
    error: BaseException | None = None


class ScoringQueue:
    """Gathers the score requests of all trajectories in flight and runs them as one batched call
    in a worker thread: the event loop never blocks on the model, and whatever arrives while
    the model is busy goes into the next batch.

    Batching changes float rounding (padding, kernel shapes) by ~1e-6. A `solo` request is run
    in a forward of its own, so its result depends on nothing but the request: the numbers
    written to trajectories.jsonl use it and are identical however the run was interrupted."""

    def __init__(self, scorer: StudentScorer):
        self.scorer = scorer
        self._pending: list[_Pending] = []
        self._wakeup = anyio.Event()
        self.batches = 0

    async def score(self, request: ScoreRequest, solo: bool = False) -> list[Score]:
        item = _Pending(request, solo)
        self._pending.append(item)
        self._wakeup.set()
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    async def serve(self) -> None:
        """Runs until cancelled (the engine cancels it when the last trajectory ends)."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            self.batches += 1
            try:
                results = await anyio.to_thread.run_sync(self._score_all, batch, abandon_on_cancel=False)
            except Exception as exc:  # handed to every waiter; the engine decides
                for item in batch:
                    item.error = exc
                    item.done.set()
                continue
            for item, result in zip(batch, results, strict=True):
                item.result = result
                item.done.set()

    def _score_all(self, batch: list[_Pending]) -> list[list[Score]]:
        shared = [item for item in batch if not item.solo]
        results = dict(zip(map(id, shared), self.scorer.score([p.request for p in shared]), strict=True))
        for item in batch:
            if item.solo:
                results[id(item)] = self.scorer.score([item.request])[0]
        return [results[id(item)] for item in batch]
