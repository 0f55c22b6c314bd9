"""Retrieval hit rates: does the memory layer retrieve the chunk a copy would need?

For every token t of a document whose last ``context`` tokens occurred exactly once before, at s, in an
earlier segment (so s is in memory, not in the local window): do the chunks retrieved for t (per head)
hold s (the same context) and s + 1 (the token that followed it)? Each document is read from an empty
memory, so memory chunk n holds the document's tokens [n*c, n*c + c).
"""
from typing import Optional

import torch

from longmem.evaluation.lm import document_spans, score_document


@torch.no_grad()
def retrieval_hits(model, stream, eos: int, tokens_per_sample: int, context: int = 6,
                   max_documents: Optional[int] = None) -> dict:
    dec, T = model.decoder, tokens_per_sample
    settings = model.memory.settings
    c = settings.chunk_size
    if T % c:
        raise ValueError(f"tokens_per_sample {T} is not a multiple of the chunk size {c}")
    captured = []
    hits = {"s": [], "s+1": []}
    spans = document_spans(stream.doc_start)[:max_documents]
    with model.memory.retrieval_hook(lambda queries, out: captured.append(out.chunk_ids[0])):  # (H, t, k / c)
        for start, end in spans:
            if end - start > settings.memory_size:
                raise ValueError(f"a document of {end - start} tokens overflows the {settings.memory_size}-token "
                                 f"memory: chunk numbers would no longer be positions")
            captured.clear()
            tokens = stream.tokens[start:end]
            score_document(model, tokens, T, eos, memory=True)
            if not captured:
                continue
            # segments 1.. (segment 0 has no memory); with grouped-query attention each segment makes one
            # search per member of a key/value head's group, member j answering query heads kv*group + j
            read = -(-len(tokens) // T) - 1
            group = len(captured) // read
            ids = torch.cat([torch.stack(captured[n * group:(n + 1) * group], dim=1).flatten(0, 1)
                             for n in range(read)], dim=1)  # (H query heads, N - T, k / c)
            src = [eos] + tokens[:-1].tolist()
            seen = {}
            for j in range(context - 1, len(src)):
                seen.setdefault(tuple(src[j - context + 1: j + 1]), []).append(j)
            for t in range(T, len(src) - 1):
                earlier = [s for s in seen[tuple(src[t - context + 1: t + 1])] if s + 1 < t // T * T]
                if len(earlier) != 1:
                    continue
                s, row = earlier[0], ids[:, t - T]
                hits["s"].append((row == s // c).any(-1))
                hits["s+1"].append((row == (s + 1) // c).any(-1))
    if not hits["s"]:
        raise ValueError("no token had a unique earlier context in memory: nothing to diagnose")
    return {"documents": len(spans), "positions": len(hits["s"]), "k": settings.k, "chunk_size": c,
            "gate": torch.sigmoid(dec.layers[dec.memory_layer_index].self_attn.memory_bias).tolist(),
            **{f"hit_{name}": torch.stack(v).float().mean(0).tolist() for name, v in hits.items()}}
