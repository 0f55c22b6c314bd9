"""Each batch row its own contiguous stream of text, read in order (the layout a cross-segment memory needs).

A split's tokens are concatenated into one stream (every line ends with ``</s>``; documents are
separated by an empty line, i.e. a lone ``</s>``), preceded by ``</s>`` as fairseq's language modelling
does, so that every token of the split is a target exactly once per epoch. The stream is cut into
``S = batch_size * num_shards`` equal contiguous parts (the last padded), rank ``shard_id`` takes rows
``[shard_id * batch_size, (shard_id + 1) * batch_size)``, and batch ``i`` holds segment ``i`` of each of
its rows: row ``b`` of batch ``i + 1`` continues row ``b`` of batch ``i``.

``layout="release"`` reproduces the release's order instead: consecutive segments, batch ``i`` =
segments ``i*B .. i*B + B - 1`` (to be read with one shared memory).
"""
import numpy as np
import torch
from fairseq.data import FairseqDataset


class TokenStream(FairseqDataset):
    """A split as one token stream, with the positions where documents start."""

    def __init__(self, dataset, eos: int):
        sizes = np.asarray(dataset.sizes, dtype=np.int64)
        self.tokens = torch.cat([torch.as_tensor(dataset[i], dtype=torch.long) for i in range(len(dataset))]) \
            if len(dataset) else torch.zeros(0, dtype=torch.long)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, dtype=np.int64)
        # a document starts at the first line and at every line that follows an empty line
        starts = [0] + [int(offsets[i]) for i in range(1, len(sizes)) if sizes[i - 1] == 1 and sizes[i] > 1]
        self.doc_start = torch.zeros(len(self.tokens), dtype=torch.bool)
        if len(self.tokens):
            self.doc_start[torch.tensor(starts)] = True
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
            raise ValueError("the longmem_language_modeling task needs --batch-size (rows = memory streams)")
        T, B = tokens_per_sample, batch_size
        src = torch.cat([torch.tensor([stream.eos]), stream.tokens[:-1]]) if len(stream.tokens) else stream.tokens
        tgt, starts = stream.tokens, stream.doc_start
        if layout == "streams":
            rows = B * num_shards
            per_row = -(-len(tgt) // rows)  # ceil: every token is a target once
            src, tgt, starts = (self._pad(x, rows * per_row, fill) for x, fill in
                                ((src, pad), (tgt, pad), (starts, False)))
            view = lambda x: x.view(rows, per_row)[shard_id * B: (shard_id + 1) * B]  # noqa: E731
            self.src, self.tgt, self.starts = view(src), view(tgt), view(starts)  # (B, per_row)
            self.num_batches = -(-per_row // T)
        elif layout == "release":
            segments = -(-len(tgt) // T)
            segments = -(-segments // (B * num_shards)) * B * num_shards
            src, tgt, starts = (self._pad(x, segments * T, fill).view(segments, T) for x, fill in
                                ((src, pad), (tgt, pad), (starts, False)))
            # rank r takes every num_shards-th batch of B consecutive segments
            order = torch.arange(segments).view(-1, num_shards, B)[:, shard_id].reshape(-1)
            self.src, self.tgt, self.starts = src[order], tgt[order], starts[order]  # (n*B, T)
            self.num_batches = len(order) // B
        else:
            raise ValueError(f"unknown stream layout {layout!r}")
        self.layout, self.B, self.T, self.pad = layout, B, T, pad

    @staticmethod
    def _pad(x, length, fill):
        if len(x) == length:
            return x
        return torch.cat([x, torch.full((length - len(x),), fill, dtype=x.dtype)])

    def __len__(self):
        return self.num_batches

    def batch(self, i):
        if self.layout == "streams":
            cut = slice(i * self.T, (i + 1) * self.T)
            return self.src[:, cut].contiguous(), self.tgt[:, cut].contiguous(), self.starts[:, cut].contiguous()
        rows = slice(i * self.B, (i + 1) * self.B)
        return self.src[rows], self.tgt[rows], self.starts[rows]

    def __getitem__(self, i):
        return i

    def num_tokens(self, index):
        return self.B * self.T

    def size(self, index):
        return self.T

    def collater(self, samples):
        if not samples:
            return {}
        i = samples[0]
        src, tgt, starts = self.batch(i)
        return {
            "id": torch.arange(i * self.B, (i + 1) * self.B),
            "nsentences": src.size(0),
            "ntokens": int(tgt.ne(self.pad).sum()),
            "net_input": {"src_tokens": src, "src_lengths": src.ne(self.pad).sum(1), "doc_start": starts},
            "target": tgt,
        }
