"""Does the memory layer retrieve the chunk a copy would need, and what is lost where?

For every token t of a document whose last ``context`` tokens occurred exactly once before, at s, in an
earlier segment (so s is in memory, not in the local window) -- ``unique_sources`` -- :

* ``retrieval_hits``: do the chunks retrieved for t (per head) hold s (the same context) and s + 1 (the
  token that followed it)?
* ``shortfall_split``: perplexity with memory off, on, with the gates of the heads that find the source
  forced open, with an oracle read (the chunks holding s and s + 1 put first among the retrieved ones),
  and both: where the memory's shortfall lies (retrieval, gate or read-out).

Each document is read from an empty memory, so memory chunk n holds the document's tokens [n*c, n*c + c).
"""
import contextlib
from typing import Dict, Optional

import torch

from longmem.evaluation.lm import Tally, document_spans, score_document


def unique_sources(tokens: torch.Tensor, eos: int, tokens_per_sample: int, context: int) -> torch.Tensor:
    """s of every position t (-1 where none): the one earlier position whose last ``context`` input tokens
    equal t's, with s + 1 before t's segment (in memory). Inputs are ``[eos] + tokens[:-1]``."""
    T = tokens_per_sample
    src = [eos] + tokens[:-1].tolist()
    seen = {}
    for j in range(context - 1, len(src)):
        seen.setdefault(tuple(src[j - context + 1: j + 1]), []).append(j)
    out = torch.full((len(src),), -1, dtype=torch.long)
    for t in range(T, len(src) - 1):
        earlier = [s for s in seen[tuple(src[t - context + 1: t + 1])] if s + 1 < t // T * T]
        if len(earlier) == 1:
            out[t] = earlier[0]
    return out


def by_query_head(captured, query_heads: int) -> torch.Tensor:
    """The chunk ids of a document's retrievals, ``captured`` as (query heads, ids (H, t, k / c)) in the order
    of the segments (with grouped-query attention several retrievals per segment, each answering some query
    heads): -> (query_heads, positions after the first segment, k / c)."""
    segments, current = [], {}
    for heads, ids in captured:
        if any(h in current for h in heads):  # a head answered again: the next segment began
            segments.append(current)
            current = {}
        current.update({h: ids[i] for i, h in enumerate(heads)})
    segments.append(current)
    missing = [n for n, seg in enumerate(segments) if sorted(seg) != list(range(query_heads))]
    if missing:
        raise ValueError(f"retrievals of segment(s) {missing} do not cover the {query_heads} query heads")
    return torch.cat([torch.stack([seg[h] for h in range(query_heads)]) for seg in segments], dim=1)


@torch.no_grad()
def retrieval_hits(model, stream, eos: int, tokens_per_sample: int, context: int = 6,
                   max_documents: Optional[int] = None) -> dict:
    dec, T = model.decoder, tokens_per_sample
    settings = model.memory.settings
    c = settings.chunk_size
    if T % c:
        raise ValueError(f"tokens_per_sample {T} is not a multiple of the chunk size {c}")
    captured = []  # per retrieval: (query heads, chunk ids (H, t, k / c)), segments 1.. in order
    hits = {"s": [], "s+1": []}
    spans = document_spans(stream.doc_start)[:max_documents]
    query_heads = dec.layers[dec.memory_layer_index].self_attn.memory_bias.numel()
    with model.memory.retrieval_hook(lambda queries, out, heads: captured.append((heads, out.chunk_ids[0]))):
        for start, end in spans:
            if end - start > settings.memory_size:
                raise ValueError(f"a document of {end - start} tokens overflows the {settings.memory_size}-token "
                                 f"memory: chunk numbers would no longer be positions")
            captured.clear()
            tokens = stream.tokens[start:end]
            score_document(model, tokens, T, eos, memory=True)
            if not captured:
                continue
            ids = by_query_head(captured, query_heads)  # (query heads, N - T, k / c)
            sources = unique_sources(tokens, eos, T, context)
            for t in torch.nonzero(sources >= 0).view(-1).tolist():
                s, row = int(sources[t]), ids[:, t - T]
                hits["s"].append((row == s // c).any(-1))
                hits["s+1"].append((row == (s + 1) // c).any(-1))
    if not hits["s"]:
        raise ValueError("no token had a unique earlier context in memory: nothing to diagnose")
    return {"documents": len(spans), "positions": len(hits["s"]), "k": settings.k, "chunk_size": c,
            "gate": torch.sigmoid(dec.layers[dec.memory_layer_index].self_attn.memory_bias).tolist(),
            **{f"hit_{name}": torch.stack(v).float().mean(0).tolist() for name, v in hits.items()}}


class OracleRead:
    """A retrieval hook that puts, for every position with a unique earlier source s (``unique_sources``),
    the chunks holding s and s + 1 first among its retrieved chunks (the rest keep their order; the last
    ones drop out), in every head: what the memory could give were retrieval perfect. With ``next_alone``
    every other slot of those positions is masked, so that memory attention puts all its weight on s + 1:
    what the read-out gives were retrieval and the choice within the retrieved tokens perfect. One row
    (batch of 1), its document read from an empty memory; ``document(sources)`` before each document."""

    def __init__(self, model, tokens_per_sample: int, next_alone: bool = False):
        self.memory, self.T, self.c = model.memory, tokens_per_sample, model.memory.settings.chunk_size
        self.sources, self.next_alone = None, next_alone

    def document(self, sources: torch.Tensor) -> None:
        self.sources = sources

    @torch.no_grad()
    def __call__(self, queries, out, query_heads) -> None:
        bank = self.memory.bank
        segment = bank.filled[0] * self.c // self.T  # the document is read from an empty memory, a segment a write
        kc, c = out.chunk_ids.size(-1), self.c
        serial_to_slot = {int(v): i for i, v in enumerate(bank.chunk_serial[0].tolist()) if v >= 0}
        begin = segment * self.T
        for t in torch.nonzero(self.sources[begin: begin + out.keys.size(2)] >= 0).view(-1).tolist():
            s = int(self.sources[begin + t])
            need = list(dict.fromkeys([s // c, (s + 1) // c]))
            for h in range(out.keys.size(1)):
                had = [x for x in out.chunk_ids[0, h, t].tolist() if x >= 0 and x not in need]
                chunks = (need + had)[:kc]
                slots = torch.tensor([serial_to_slot[x] for x in chunks], device=out.keys.device)
                n = len(chunks) * c
                out.keys[0, h, t, :n] = bank.keys[0, h, slots].flatten(0, 1).to(out.keys.dtype)
                out.values[0, h, t, :n] = bank.values[0, h, slots].flatten(0, 1).to(out.values.dtype)
                out.mask[0, h, t, :n] = True
                out.chunk_ids[0, h, t, :len(chunks)] = torch.tensor(chunks)
                if self.next_alone:  # the slot of s + 1 alone: its chunk's place in ``need``, its place in the chunk
                    out.mask[0, h, t] = False
                    out.mask[0, h, t, need.index((s + 1) // c) * c + (s + 1) % c] = True


@contextlib.contextmanager
def gates_forced(model, heads, logit: float = 20.0):
    """Within the block, the memory layer's gates of ``heads`` (query heads) hold ``logit`` (σ = 1 - 2e-9
    at 20: memory alone in those heads)."""
    dec = model.decoder
    gate = dec.layers[dec.memory_layer_index].self_attn.memory_bias
    saved = gate.detach().clone()
    with torch.no_grad():
        gate[list(heads)] = logit
    try:
        yield
    finally:
        with torch.no_grad():
            gate.copy_(saved)


@torch.no_grad()
def shortfall_split(model, stream, eos: int, tokens_per_sample: int, marks: torch.Tensor, open_heads,
                    context: int = 6, max_documents: Optional[int] = None, progress=None) -> Dict[str, dict]:
    """Perplexity (all tokens, and per mark value: 1 recurring, 2 queried) of each variant: memory off,
    memory on, the gates of ``open_heads`` forced open, the oracle read, the oracle read with those gates
    open, the oracle read of s + 1 alone (``OracleRead(next_alone=True)``, the read-out's ceiling). Returns
    {variant: {"all": ppl, 1: ppl, 2: ppl, ...}}."""
    if len(marks) != len(stream.tokens):
        raise ValueError(f"{len(marks)} token marks for a stream of {len(stream.tokens)} tokens")
    oracle, alone = OracleRead(model, tokens_per_sample), OracleRead(model, tokens_per_sample, next_alone=True)
    nothing = contextlib.nullcontext
    variants = {"memory off": (False, nothing, None), "memory on": (True, nothing, None),
                "gates of finding heads open": (True, lambda: gates_forced(model, open_heads), None),
                "oracle read": (True, nothing, oracle),
                "oracle read, gates open": (True, lambda: gates_forced(model, open_heads), oracle),
                "oracle read of s+1 alone": (True, nothing, alone)}
    spans = document_spans(stream.doc_start)[:max_documents]
    sources = [unique_sources(stream.tokens[start:end], eos, tokens_per_sample, context) for start, end in spans]
    result = {}
    for name, (memory, gates, hook_of) in variants.items():
        tally = Tally()
        hook = model.memory.retrieval_hook(hook_of) if hook_of else nothing()
        with gates(), hook:
            for n, (start, end) in enumerate(spans if progress is None else progress(spans, desc=name, unit="doc")):
                tokens, doc_marks = stream.tokens[start:end], marks[start:end]
                oracle.document(sources[n])  # computed once per document, read by the oracle variants
                alone.document(sources[n])
                nll = score_document(model, tokens, tokens_per_sample, eos, memory=memory)
                tally.add("all", nll)
                for value in doc_marks.unique().tolist():
                    if value:
                        tally.add(value, nll[doc_marks == value])
        result[name] = tally.ppl()
    return result
