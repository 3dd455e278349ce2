"""Per-row next-token choice for a batch whose rows each carry their own settings.

Order of transforms (vLLM's): repetition, frequency and presence penalties and logit_bias on
the raw logits; EOS masked while a row must go on; then temperature, top-k, top-p, min-p; then a
draw from the row's own generator (seeded rows reproduce). Temperature 0 is greedy. Logprobs are
the model's raw log-probabilities (log-softmax of the logits before any of these transforms),
as vLLM reports by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from tokenrelay.wire import SamplingParams


class Constraint(Protocol):
    """Constrained decoding for one sequence (a grammar, a JSON schema, a forced tool call)."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of the tokens the constraint forbids now to -inf (one row, in place)."""

    def accept(self, token_id: int) -> None:
        """Advance past the token that was chosen."""


@dataclass
class RowState:
    """What sampling needs to know about one sequence at this step."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    suppress_ids: list[int] = field(default_factory=list)  # tokens banned this step (EOS)
    constraint: Constraint | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _temperature(p: SamplingParams) -> float:
    return 1.0 if p.temperature is None else p.temperature


def _top_p(p: SamplingParams) -> float:
    return 1.0 if p.top_p is None else p.top_p


def _needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _apply_row_adjustments(logits: torch.Tensor, rows: list[RowState]) -> None:
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if _needs_penalty(p):
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long,
                                    device=logits.device)
                seen = seen[seen < vocab]
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if row.output_ids and (p.frequency_penalty or p.presence_penalty):
                out = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            keep = ids < vocab
            logits[i, ids[keep]] += bias[keep]
        if row.suppress_ids:
            logits[i, row.suppress_ids] = float("-inf")
        if row.constraint is not None:
            row.constraint.mask(logits[i])


def _filter(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows that sample (all rows of ``logits``)."""
    device = logits.device
    temps = torch.tensor([_temperature(r.params) for r in rows], dtype=logits.dtype, device=device)
    logits = logits / temps.unsqueeze(1)
    top_k = [r.params.top_k for r in rows]
    top_p = [_top_p(r.params) for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=device).unsqueeze(0)
        k = torch.tensor([k if k > 0 else logits.shape[-1] for k in top_k], device=device).unsqueeze(1)
        drop = ranks >= k
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        p = torch.tensor(top_p, dtype=logits.dtype, device=device).unsqueeze(1)
        drop |= before >= p
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(m > 0 for m in min_p):
        probs = torch.softmax(logits, dim=-1)
        floor = torch.tensor(min_p, dtype=logits.dtype, device=device).unsqueeze(1) * probs.max(-1, True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: list[RowState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose one token per row of ``logits`` ([rows, vocab]); logprobs where a row asks."""
    logits = logits.float()
    want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
    _apply_row_adjustments(logits, rows)

    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if _temperature(r.params) == 0.0 or r.params.top_k == 1]
    sampled = [i for i in range(len(rows)) if i not in set(greedy)]
    if greedy:
        chosen[greedy] = logits[greedy].argmax(dim=-1)
    if sampled:
        probs = torch.softmax(_filter(logits[sampled], [rows[i] for i in sampled]), dim=-1)
        unseeded = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        if unseeded:
            draws = torch.multinomial(probs[unseeded], 1).squeeze(1)
            chosen[[sampled[j] for j in unseeded]] = draws
        for j, i in enumerate(sampled):
            gen = rows[i].generator
            if gen is not None:
                chosen[i] = torch.multinomial(probs[j].to(gen.device), 1, generator=gen).to(chosen.device)[0]
    tokens: list[int] = chosen.tolist()

    out: list[TokenLogprob | None] = [None] * len(rows)
    if raw is not None:
        for j, i in enumerate(want_logprobs):
            k = rows[i].params.logprobs or 0
            top: list[tuple[int, float]] = []
            if k > 0:
                values, ids = torch.topk(raw[j], k)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out[i] = TokenLogprob(tokens[i], float(raw[j, tokens[i]]), top)
    return tokens, out
