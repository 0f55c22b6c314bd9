"""Each batch row its own contiguous stream of text, read in order (the layout a cross-segment memory needs).

A split's tokens are concatenated into one stream (every line ends with ``</s>``; documents are
separated by an empty line, i.e. a lone ``</s>``), preceded by ``</s>`` as fairseq's language modelling
does, so that every token of the split is a target exactly once per epoch. The stream is cut into
``S = batch_size * num_shards`` equal contiguous parts (the last padded), rank ``shard_id`` takes rows
``[shard_id * batch_size, (shard_id + 1) * batch_size)``, and batch ``i`` holds segment ``i`` of each of
its rows: row ``b`` of batch ``i + 1`` continues row ``b`` of batch ``i``.

``layout="release"`` is the release's order (``--data-no-shuffle``, docs/design.md §5.1): the stream is
cut into blocks of ``tokens_per_sample`` (samples 0 .. N-1, as fairseq's TokenBlockDataset cuts it) and
``release_batches`` arranges them exactly as the release's iterator does. Rows are then contiguous
streams of whole blocks; the last block and the tail of longer passages are never read.
"""
import math
from typing import List

import numpy as np
import torch
from fairseq.data import FairseqDataset

from longmem.errors import ConfigError


def release_batches(num_samples: int, batch_size: int, num_shards: int = 1, shard_id: int = 0) -> List[List[int]]:
    """The sample ids of each batch of rank ``shard_id``, as the release's ``--data-no-shuffle`` iterator
    makes them from samples ``0 .. num_samples - 1`` (fairseq/data/iterators.py of the release)."""
    if num_samples < 1:
        return []
    total = num_samples - 1  # the release takes the last sample's id as the count: the last is never read
    bsz = min(batch_size, num_samples)  # the size of fairseq's first batch
    passages = num_shards * bsz
    length = math.ceil(total / passages)
    mine = [range(i * length, min((i + 1) * length, total)) for i in range(shard_id * bsz, (shard_id + 1) * bsz)]
    return [[p[i] for p in mine] for i in range(min(len(p) for p in mine))]


def read_marks(path: str) -> torch.Tensor:
    """A ``.marks`` file (one 0 or 1 a line, one line per document of the split; longmem.corpus.mix.write_marks)
    as a bool tensor, one entry per document."""
    flags = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip() not in ("0", "1"):
                raise ConfigError(f"{path}, line {n}: a .marks file holds one 0 or 1 a line (one per document), "
                                  f"got {line.strip()[:40]!r}")
            flags.append(line.strip() == "1")
    return torch.tensor(flags, dtype=torch.bool)


class TokenStream(FairseqDataset):
    """A split as one token stream, with the positions where documents start and, given ``marks`` (one bool per
    document), which tokens belong to a marked document (``self.marked``; None without marks)."""

    def __init__(self, dataset, eos: int, marks: torch.Tensor = None, marks_name: str = "marks"):
        sizes = np.asarray(dataset.sizes, dtype=np.int64)
        self.tokens = torch.cat([torch.as_tensor(dataset[i], dtype=torch.long) for i in range(len(dataset))]) \
            if len(dataset) else torch.zeros(0, dtype=torch.long)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, dtype=np.int64)
        # a document starts at the first line and at every line that follows an empty line
        starts = [0] + [int(offsets[i]) for i in range(1, len(sizes)) if sizes[i - 1] == 1 and sizes[i] > 1]
        self.doc_start = torch.zeros(len(self.tokens), dtype=torch.bool)
        if len(self.tokens):
            self.doc_start[torch.tensor(starts)] = True
        self.marked = None
        if marks is not None:
            if len(marks) != len(starts) or not len(self.tokens):
                raise ConfigError(f"{marks_name} marks {len(marks)} documents, the split has {len(starts)} (documents "
                                  f"are separated by an empty line): write it for this split (one 0/1 per document)")
            document = torch.cumsum(self.doc_start.long(), 0) - 1  # each token's document: its separator goes with it
            self.marked = marks[document]
        self.eos = eos
        self.sizes = np.array([len(self.tokens)])

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]


class StreamBatches(FairseqDataset):
    """Item ``i`` is the whole batch ``i`` (fairseq's iterator is given one item per batch)."""

    def __init__(self, stream: TokenStream, batch_size: int, tokens_per_sample: int, pad: int,
                 num_shards: int = 1, shard_id: int = 0, layout: str = "streams"):
        if batch_size is None or batch_size < 1:
            raise ConfigError("the longmem_language_modeling task needs --batch-size (rows = memory streams)")
        T, B = tokens_per_sample, batch_size
        src = torch.cat([torch.tensor([stream.eos]), stream.tokens[:-1]]) if len(stream.tokens) else stream.tokens
        tgt, starts = stream.tokens, stream.doc_start
        # a target's mark is its own token's (the token it predicts belongs to that document)
        marked = stream.marked if stream.marked is not None else torch.zeros(0, dtype=torch.bool)
        if layout == "streams":
            rows = B * num_shards
            per_row = -(-len(tgt) // rows)  # ceil: every token is a target once
            src, tgt, starts, marked = (self._pad(x, rows * per_row, fill) for x, fill in
                                        ((src, pad), (tgt, pad), (starts, False), (marked, False)))
            view = lambda x: x.view(rows, per_row)[shard_id * B: (shard_id + 1) * B]  # noqa: E731
            self.src, self.tgt, self.starts, self.marked = view(src), view(tgt), view(starts), view(marked)
            self.num_batches = -(-per_row // T)
        elif layout == "release":
            samples = -(-len(tgt) // T)  # blocks of T tokens, the last one shorter
            self.src, self.tgt, self.starts, self.marked = (
                self._pad(x, samples * T, fill).view(samples, T) for x, fill in
                ((src, pad), (tgt, pad), (starts, False), (marked, False)))  # (N, T)
            # every rank stops with the one whose passages are shortest (the release's ranks could disagree
            # on their number of batches, which stalls data-parallel training at the end of an epoch)
            per_rank = [release_batches(samples, B, num_shards, s) for s in range(num_shards)]
            self.num_batches = min(len(batches) for batches in per_rank)
            self.batch_ids = per_rank[shard_id][:self.num_batches]
        else:
            raise ConfigError(f"unknown stream layout {layout!r}")
        self.layout, self.B, self.T, self.pad = layout, B, T, pad
        self.has_marks = stream.marked is not None

    @staticmethod
    def _pad(x, length, fill):
        if len(x) == length:
            return x
        return torch.cat([x, torch.full((length - len(x),), fill, dtype=x.dtype)])

    def __len__(self):
        return self.num_batches

    def sample_ids(self, i) -> torch.Tensor:
        """The ids of batch ``i``'s rows: block numbers in the release layout, ``i*B + b`` otherwise."""
        if self.layout == "release":
            return torch.tensor(self.batch_ids[i])
        return torch.arange(i * self.B, (i + 1) * self.B)

    def batch(self, i):
        """Batch ``i``'s (src, tgt, doc_start, marked) tensors, each (rows, T)."""
        if self.layout == "streams":
            cut = slice(i * self.T, (i + 1) * self.T)
            return tuple(x[:, cut].contiguous() for x in (self.src, self.tgt, self.starts, self.marked))
        rows = self.sample_ids(i)
        return self.src[rows], self.tgt[rows], self.starts[rows], self.marked[rows]

    def __getitem__(self, i):
        return i

    def num_tokens(self, index):
        return self.B * self.T  # an upper bound, all fairseq needs

    def size(self, index):
        return self.T

    def collater(self, samples):
        if not samples:
            return {}
        i = samples[0]
        src, tgt, starts, marked = self.batch(i)
        sample = {
            "id": self.sample_ids(i),
            "nsentences": src.size(0),
            "ntokens": int(tgt.ne(self.pad).sum()),
            "net_input": {"src_tokens": src, "src_lengths": src.ne(self.pad).sum(1), "doc_start": starts},
            "target": tgt,
        }
        if self.has_marks:  # beside the target, not an input: the criterion reads it (--distill-on marked)
            sample["marked"] = marked
        return sample
