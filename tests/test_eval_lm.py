"""Long-document evaluation: per-token losses against an independent recomputation, buckets and bins."""

import torch

from longmem.evaluation.lm import (document_spans, length_bucket, position_bin, position_bin_label, position_bins,
                                  score_document)
from longmem.modules.memory_bank import ChunkedMemoryBank



def test_per_token_losses_equal_a_recomputation_with_memory_rebuilt_from_scratch(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=24, k=4, chunk_size=2)
    model.eval()
    T, eos = 8, d.eos()
    tokens = torch.randint(4, 44, (37,))
    got = score_document(model, tokens, T, eos, memory=True)

    src = torch.cat([torch.tensor([eos]), tokens[:-1]])
    decoder = model.decoder
    backbone = decoder.pretrained_model
    expected = []
    with torch.no_grad():
        for j, start in enumerate(range(0, len(tokens), T)):
            # the memory a reader of segment j should have: the backbone's layer-m keys/values of the
            # earlier segments, each written whole-chunks-only, oldest evicted first
            bank = ChunkedMemoryBank(4, 8, 24, 2, 4, num_streams=1, backend="torch", dtype=torch.float32)
            for prev in range(0, start, T):
                k, v = backbone(src[None, prev: prev + T], return_retrieval_kv=True)[1]["retrieval_kv"]
                bank.add(k, v)
            model.memory.load_bank(bank)
            model.memory.configure(enabled=True, writes=False)
            logits = model(src[None, start: start + T])[0][0]
            lp = torch.log_softmax(logits.double(), -1)
            expected.append(-lp.gather(-1, tokens[start: start + T, None]).squeeze(-1))
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-9)
    off = score_document(model, tokens, T, eos, memory=False)
    assert torch.allclose(off[:T], got[:T]) and not torch.allclose(off[T:], got[T:])


def test_buckets_bins_and_spans():
    assert [length_bucket(n) for n in (10, 5_000, 99_999, 100_000, 2_000_000)] == \
        ["<5k", "5k-10k", "10k-100k", "100k-500k", ">1M"]
    assert [position_bin(p) for p in (0, 255, 256, 511, 512, 1023, 1024)] == [0, 0, 1, 1, 2, 2, 3]
    assert position_bins(5000).tolist() == [position_bin(p) for p in range(5000)]
    assert [position_bin_label(b) for b in (0, 1, 3)] == ["0-256", "256-512", "1024-2048"]
    starts = torch.zeros(10, dtype=torch.bool)
    starts[[0, 4, 7]] = True
    assert document_spans(starts) == [(0, 4), (4, 7), (7, 10)]
