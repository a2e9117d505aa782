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
from dataclasses import dataclass
from typing import Any

from genssd_cli.data import render_prompt
from genssd_cli.kv_cache import (
    PrefixCache,
    PrefixEntry,
    cache_argument,
    from_cache,
    output_cache,
    slice_kv,
    supports_prefix_cache,
    to_cache,
)
from genssd_cli.methods import lowest_index


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


def default_batch_tokens(device: str, configured: int | None) -> int:
    """A GPU wants big batches across trajectories. A CPU does not: on 2 cores, the demo student
    scored 510 candidate tokens/s one trajectory per forward and 436 batching 8 of them."""
    if configured is not None:
        return configured
    return 8192 if device == "cuda" else 512


def lowest_ppl(scores: list[Score]) -> int:
    """The selection rule: the candidate the student finds easiest (first one on ties)."""
    return lowest_index([s.ppl for s in scores])


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
        return cls(model, tokenizer, device, user_template, default_batch_tokens(device, cfg.batch_tokens),
                   cfg.cache_mb * 2**20)  # fmt: skip

    def user_message(self, question: str) -> str:
        return render_prompt(self.user_template, question)

    def prompt_text(self, question: str) -> str:
        """The student-side prompt: its own chat template with the generation prompt opened."""
        from genssd_cli.models import chat_prompt

        return chat_prompt(self.tokenizer, self.user_message(question))

    def _encode(self, text: str) -> list[int]:
        # The chat template already holds the special tokens.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def peak_cache_mb(self) -> float | None:
        return None if self.cache is None else round(self.cache.peak_bytes / 2**20, 1)

    def forget(self, key: Any) -> None:
        """The trajectory ended: its cache is no longer worth memory."""
        if self.cache is not None:
            self.cache.drop(key)

    def score(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        results: list[list[Score] | None] = [None] * len(requests)
        naive = [i for i, r in enumerate(requests) if r.key is None or self.cache is None]
        cached = [i for i in range(len(requests)) if i not in naive]
        steps = [(requests[i].key, *self._tokenize(requests[i])) for i in cached]
        for i, scores in zip(cached, self.score_steps_cached(steps), strict=True):
            results[i] = scores
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

    def score_steps_cached(self, steps: list[tuple[Any, list[int], list[tuple[list[int], int]]]]) -> list[list[Score]]:
        """Steps of many trajectories, their candidates batched into forwards under the token budget."""
        results: list[list[Score]] = []
        group: list = []
        rows = width = 0
        for step in steps:
            shared = min(start for _, start in step[2]) - 1
            step_width = max(len(full) for full, _ in step[2]) - shared
            if group and (rows + len(step[2])) * max(width, step_width) > self.batch_tokens:
                results.extend(self._forward_steps(group))
                group, rows, width = [], 0, 0
            group.append(step)
            rows += len(step[2])
            width = max(width, step_width)
        if group:
            results.extend(self._forward_steps(group))
        return results

    def _forward_steps(self, steps) -> list[list[Score]]:
        import torch

        prepared = []  # (key, shared, prefix kv, sequences)
        with torch.inference_mode():
            for key, context, sequences in steps:
                # Positions every candidate shares, less one: that token is fed again with the
                # candidates so that its logits score each candidate's first token. At a seam
                # (the chunk merged with the prefix's last token) this rolls the cache back.
                shared = min(start for _, start in sequences) - 1
                entry = self.cache.get(key)
                reused = common_prefix_len(entry.ids, context[:shared]) if entry else 0
                kv = slice_kv(entry.kv, 0, reused) if reused else None
                if reused < shared:  # new prefix tokens (a seam), or all of them after an eviction
                    kv = self._extend(kv, context[reused:shared], reused)
                prepared.append((key, shared, kv, sequences))
            # One padded batch: each row is [left pad | its prefix (cached) | candidate | right pad].
            span = max(shared for _, shared, _, _ in prepared)
            owners = [(i, full) for i, (_, _, _, sequences) in enumerate(prepared) for full, _ in sequences]
            width = max(len(full) - prepared[i][1] for i, full in owners)
            ids = torch.full((len(owners), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(owners), span + width), dtype=torch.long)
            positions = torch.zeros((len(owners), width), dtype=torch.long)
            for r, (i, full) in enumerate(owners):
                shared = prepared[i][1]
                row = full[shared:]
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, span - shared : span + len(row)] = 1
                positions[r] = torch.arange(shared, shared + width)
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **{self._cache_arg: to_cache(self._padded_past(prepared, span))},
            )
            self.forward_tokens += ids.numel()
            cache_out = from_cache(output_cache(out))
            results, r = [], 0
            for key, shared, _, sequences in prepared:
                scores = []
                for full, start in sequences:
                    count = len(full) - start
                    if count == 0:
                        scores.append(Score(math.inf, 0))
                    else:
                        first = start - shared - 1  # logits at index k predict the token after it
                        logprobs = torch.log_softmax(out.logits[r, first : first + count].float(), dim=-1)
                        targets = torch.tensor(full[start:], device=logprobs.device)
                        nll = -float(logprobs.gather(-1, targets[:, None]).sum())
                        scores.append(Score(math.exp(nll / count), count))
                    r += 1
                # Keep the candidate the engine will accept (same rule): the next step's prefix.
                best = lowest_ppl(scores)
                kept, row = sequences[best][0], r - len(sequences) + best
                begin = span - shared  # the row's first real position
                kept_kv = slice_kv([(k[:, :, begin:], v[:, :, begin:]) for k, v in cache_out], row, len(kept))
                kv = [(k.clone(), v.clone()) for k, v in kept_kv]  # a copy: the batch's tensors can go
                self.cache.put(key, PrefixEntry(kept, kv))
                results.append(scores)
        return results

    def _padded_past(self, prepared, span: int):
        """Each step's prefix cache, repeated for its candidates and left-padded to `span`."""
        if span == 0:
            return None
        template = next(kv for _, _, kv, _ in prepared if kv)
        rows = sum(len(sequences) for *_, sequences in prepared)
        past = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros((rows, k0.shape[1], span, k0.shape[3]))
            values = v0.new_zeros((rows, v0.shape[1], span, v0.shape[3]))
            r = 0
            for _, shared, kv, sequences in prepared:
                if shared:
                    keys[r : r + len(sequences), :, span - shared :] = kv[layer][0]
                    values[r : r + len(sequences), :, span - shared :] = kv[layer][1]
                r += len(sequences)
            past.append((keys, values))
        return past

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
