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
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from genssd_cli.errors import StopRequested
from genssd_cli.problems import render_prompt
from genssd_cli.student.kv_cache import (
    KV,
    PrefixCache,
    PrefixEntry,
    cache_argument,
    from_cache,
    output_cache,
    slice_kv,
    supports_prefix_cache,
    to_cache,
)

Select = Callable[[Sequence[float]], int]  # a method's selection rule: candidate PPLs -> the kept index


@dataclass(frozen=True)
class ScoreRequest:
    context: str  # student prompt + accepted prefix
    candidates: list[str]
    key: Any = None  # the trajectory, whose prefix cache may be used; None: score from scratch
    keep: Select | None = None  # with a key: the rule that picks the candidate the trajectory continues with

    def __post_init__(self) -> None:
        if self.key is not None and self.keep is None:
            raise ValueError("a request that names its trajectory needs the method's selection rule (keep)")


@dataclass(frozen=True)
class Score:
    ppl: float  # inf when the candidate has no tokens of its own
    tokens: int


@dataclass(frozen=True)
class Tokenized:
    """A candidate as the student reads it: the ids of context + candidate, and the index of the
    candidate's first own token (a token merged across the seam counts as the candidate's)."""

    ids: list[int]
    start: int

    @property
    def own(self) -> int:
        return len(self.ids) - self.start


@dataclass(frozen=True)
class Step:
    """One trajectory's step for the cached path: its context ids and candidates, and the rule
    that says which candidate's keys and values become the next step's prefix."""

    key: Any
    context: list[int]
    candidates: list[Tokenized]
    keep: Select

    @property
    def shared(self) -> int:
        """Positions every candidate shares, less one: that token is fed again with the
        candidates so that its logits score each candidate's first token. At a seam (the chunk
        merged with the prefix's last token) this rolls the cache back."""
        return min(c.start for c in self.candidates) - 1

    @property
    def width(self) -> int:
        return max(len(c.ids) for c in self.candidates) - self.shared


@dataclass
class _Prepared:
    step: Step
    kv: KV | None  # the prefix's keys and values for step.shared positions (batch 1)


def _check_between_blocks(model, flag: threading.Event) -> None:
    """A forward can run for minutes (a long prompt, a big batch, a CPU); a stop must not wait
    for it. Every member of the model's module lists (its decoder layers) checks `flag` first."""
    from torch import nn

    def check(_module, _args) -> None:
        if flag.is_set():
            raise StopRequested

    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.register_forward_pre_hook(check)


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
        self._interrupted = threading.Event()
        _check_between_blocks(model, self._interrupted)

    def interrupt(self) -> None:
        """Called from another thread when the run stops: the forward in progress raises
        StopRequested at the model's next block, and so does every later one."""
        self._interrupted.set()

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

    @property
    def context_length(self) -> int | None:
        """The longest sequence the student holds (its position embeddings), when it says."""
        config = self.model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    def prompt_tokens(self, question: str) -> int:
        return len(self._encode(self.prompt_text(question)))

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
        steps = [self._step(requests[i]) for i in cached]
        for i, scores in zip(cached, self.score_steps(steps), strict=True):
            results[i] = scores
        for i, scores in zip(naive, self.score_naive([requests[i] for i in naive]), strict=True):
            results[i] = scores
        return results

    def _tokenize(self, request: ScoreRequest) -> tuple[list[int], list[Tokenized]]:
        """Context ids, and each candidate tokenized after the context."""
        context = self._encode(request.context)
        candidates = []
        for text in request.candidates:
            full = self._encode(request.context + text)
            candidates.append(Tokenized(full, max(common_prefix_len(context, full), 1)))
        return context, candidates

    def _step(self, request: ScoreRequest) -> Step:
        context, candidates = self._tokenize(request)
        return Step(request.key, context, candidates, request.keep)

    def prefill(self, key: Any, ids: list[int]) -> None:
        """Compute and keep the prefix cache of `ids` for a trajectory, as if earlier steps had
        built it (genssd bench scoring starts its timing from there)."""
        import torch

        with torch.inference_mode():
            self.cache.put(key, PrefixEntry(list(ids), self._extend(None, ids, 0)))

    def score_steps(self, steps: list[Step]) -> list[list[Score]]:
        """Steps of many trajectories, their candidates batched into forwards under the token budget."""
        results: list[list[Score]] = []
        group: list[Step] = []
        rows = width = 0
        for step in steps:
            if group and (rows + len(step.candidates)) * max(width, step.width) > self.batch_tokens:
                results.extend(self._forward_steps(group))
                group, rows, width = [], 0, 0
            group.append(step)
            rows += len(step.candidates)
            width = max(width, step.width)
        if group:
            results.extend(self._forward_steps(group))
        return results

    def _forward_steps(self, steps: list[Step]) -> list[list[Score]]:
        import torch

        prepared: list[_Prepared] = []
        with torch.inference_mode():
            for step in steps:
                shared = step.shared
                entry = self.cache.get(step.key)
                reused = common_prefix_len(entry.ids, step.context[:shared]) if entry else 0
                kv = slice_kv(entry.kv, 0, reused) if reused else None
                if reused < shared:  # new prefix tokens (a seam), or all of them after an eviction
                    kv = self._extend(kv, step.context[reused:shared], reused)
                prepared.append(_Prepared(step, kv))
            # One padded batch: each row is [left pad | its prefix (cached) | candidate | right pad].
            span = max(p.step.shared for p in prepared)
            owners = [(p.step.shared, c) for p in prepared for c in p.step.candidates]
            width = max(len(c.ids) - shared for shared, c in owners)
            ids = torch.full((len(owners), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(owners), span + width), dtype=torch.long)
            positions = torch.zeros((len(owners), width), dtype=torch.long)
            for r, (shared, candidate) in enumerate(owners):
                row = candidate.ids[shared:]
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
            for p in prepared:
                shared, scores = p.step.shared, []
                for candidate in p.step.candidates:
                    if candidate.own == 0:
                        scores.append(Score(math.inf, 0))
                    else:
                        first = candidate.start - shared - 1  # logits at index k predict the token after it
                        logits = out.logits[r, first : first + candidate.own].float()
                        logprobs = torch.log_softmax(logits, dim=-1)
                        targets = torch.tensor(candidate.ids[candidate.start :], device=logprobs.device)
                        nll = -float(logprobs.gather(-1, targets[:, None]).sum())
                        scores.append(Score(math.exp(nll / candidate.own), candidate.own))
                    r += 1
                # The candidate the method keeps is the next step's prefix: keep its keys and values.
                best = p.step.keep([s.ppl for s in scores])
                kept, row = p.step.candidates[best].ids, r - len(p.step.candidates) + best
                begin = span - shared  # the row's first real position
                kept_kv = slice_kv([(k[:, :, begin:], v[:, :, begin:]) for k, v in cache_out], row, len(kept))
                kv = [(k.clone(), v.clone()) for k, v in kept_kv]  # a copy: the batch's tensors can go
                self.cache.put(p.step.key, PrefixEntry(kept, kv))
                results.append(scores)
        return results

    def _padded_past(self, prepared: list[_Prepared], span: int):
        """Each step's prefix cache, repeated for its candidates and left-padded to `span`."""
        if span == 0:
            return None
        template = next(p.kv for p in prepared if p.kv)
        rows = sum(len(p.step.candidates) for p in prepared)
        past = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros((rows, k0.shape[1], span, k0.shape[3]))
            values = v0.new_zeros((rows, v0.shape[1], span, v0.shape[3]))
            r = 0
            for p in prepared:
                count, shared = len(p.step.candidates), p.step.shared
                if shared:
                    keys[r : r + count, :, span - shared :] = p.kv[layer][0]
                    values[r : r + count, :, span - shared :] = p.kv[layer][1]
                r += count
            past.append((keys, values))
        return past

    def _extend(self, kv: KV | None, tokens: list[int], offset: int) -> KV:
        import torch

        ids = torch.tensor([tokens], device=self.device)
        positions = torch.arange(offset, offset + len(tokens), device=self.device)[None]
        # Only the keys and values are wanted: the LM head over a long prompt (tokens x vocabulary)
        # would cost more than a layer and could not be interrupted.
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: to_cache(kv)})  # fmt: skip
        self.forward_tokens += len(tokens)
        return from_cache(output_cache(out))

    def score_naive(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        sequences: list[Tokenized] = []
        for request in requests:
            sequences.extend(self._tokenize(request)[1])
        nll = self.sequence_nll(sequences)
        scores = [Score(math.exp(nll[i] / s.own) if s.own else math.inf, s.own) for i, s in enumerate(sequences)]
        out, i = [], 0
        for request in requests:
            out.append(scores[i : i + len(request.candidates)])
            i += len(request.candidates)
        return out

    def sequence_nll(self, sequences: list[Tokenized]) -> list[float]:
        """Summed NLL of each sequence's own tokens (ids[start:]), in padded batches under the token budget."""
        totals = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))
        batch: list[int] = []
        for index in order:
            width = len(sequences[batch[0] if batch else index].ids)
            if batch and (len(batch) + 1) * width > self.batch_tokens:
                self._nll_batch([sequences[i] for i in batch], batch, totals)
                batch = []
            batch.append(index)
        if batch:
            self._nll_batch([sequences[i] for i in batch], batch, totals)
        return totals

    def _nll_batch(self, batch: list[Tokenized], indices: list[int], totals: list[float]) -> None:
        import torch

        width = max(len(s.ids) for s in batch)
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, width - len(s.ids) :] = torch.tensor(s.ids)  # left padding: targets end aligned
            mask[row, width - len(s.ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(s.own for s in batch) + 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=keep,
                use_cache=False,
            ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (s, i) in enumerate(zip(batch, indices, strict=True)):
            if s.own == 0:
                continue
            # logits index j is absolute position width-keep+j and predicts the token after it.
            first = keep - 1 - s.own
            targets = torch.tensor(s.ids[s.start :], device=logprobs.device)
            picked = logprobs[row, first : first + s.own].gather(-1, targets[:, None])
            totals[i] = -float(picked.sum())
        self.forward_tokens += ids.numel()
