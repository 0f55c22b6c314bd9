"""Incremental decoding of LongMem models against the full forward, memory in generation, beams, sampling."""
from types import SimpleNamespace

import pytest
import torch

from longmem.evaluation.lm import score_document


def sidenet_over_newgpt(make_sidenet, d, memory):
    model, _ = make_sidenet(d, use_external_memory=memory, memory_size=24, k=4, chunk_size=2)
    for p in model.decoder.layers.parameters():  # a SideNet that says something (zero-initialised parts too)
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def sidenet_over_llama(llama, memory):
    from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet

    path, d = llama
    cfg = SideNetConfig(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64,
                        retrieval_layer_index=2, pretrained_model_path=str(path), dropout=0.0, attention_dropout=0.0,
                        memory_size=24, k=4, chunk_size=2, memory_backend="torch", use_external_memory=memory,
                        reload_ptm_layer=True, memory_gate_init=1.0)
    task = SimpleNamespace(target_dictionary=d, source_dictionary=d)
    return TransformerLanguageModelSideNet.build_model(cfg, task).eval()


@pytest.fixture(params=["newgpt", "llama"])
def build(request, make_sidenet, make_dictionary):
    """``build(memory) -> (LongMem model, dictionary)`` over either backbone family."""
    if request.param == "newgpt":
        d = make_dictionary(40)
        return lambda memory: (sidenet_over_newgpt(make_sidenet, d, memory), d)
    llama = request.getfixturevalue("llama")
    return lambda memory: (sidenet_over_llama(llama, memory), llama[1])


def stream_log_probs(model, src, window, memory):
    """Log-probs (N, V) of every position of ``src`` (1-D) by the full forward, read in segments of ``window``
    as the streaming evaluation reads a document: memory emptied first, each segment read then written."""
    out = []
    with torch.no_grad(), model.memory.configured(slot="eval", enabled=memory):
        model.memory.reset()
        for start in range(0, len(src), window):
            out.append(torch.log_softmax(model(src[None, start: start + window])[0][0].double(), -1))
    return torch.cat(out)


def token_by_token_log_probs(model, src):
    """Log-probs (N, V) of every position of ``src`` (1-D), fed to incremental decoding one token a call."""
    state = {}
    with torch.no_grad():
        steps = torch.cat([model(src[None, : t + 1], incremental_state=state)[0][0, -1:] for t in range(len(src))])
    return torch.log_softmax(steps.double(), -1)


@pytest.mark.parametrize("memory", [False, True])
def test_token_by_token_and_in_pieces_equal_the_full_forward(build, memory):
    model, d = build(memory)
    window = 8
    model.decoder.window = window
    src = torch.cat([torch.tensor([d.eos()]), torch.randint(4, len(d), (36,))])
    full = stream_log_probs(model, src, window, memory)
    torch.testing.assert_close(token_by_token_log_probs(model, src), full, rtol=0, atol=1e-4)
    state = {}  # a prompt that crosses two segment ends in one call, then one that ends on a segment end
    with torch.no_grad():
        pieces = torch.cat([model(src[None, :n], incremental_state=state)[0][0] for n in (21, 24, 37)])
    torch.testing.assert_close(torch.log_softmax(pieces.double(), -1), full, rtol=0, atol=1e-4)
    if memory:  # memory was read: the segments after the first differ from the model without memory
        off = stream_log_probs(model, src, window, False)
        torch.testing.assert_close(off[:window], full[:window], rtol=0, atol=1e-9)
        assert (off[window:] - full[window:]).abs().max() > 1e-3


@pytest.mark.parametrize("mix", ["token", "memory"])
def test_a_model_mixed_with_its_backbone_decodes_as_its_full_forward(make_sidenet, make_dictionary, mix):
    """--mix-with-backbone token or memory: the features carry both the SideNet's and the backbone's state (and the
    memory layer's evidence), so token by token gives the full forward's mixture (and it differs from the SideNet
    alone)."""
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=24, k=4, chunk_size=2, mix_with_backbone=mix,
                            mix_memory_slope=2.0, mix_memory_center=0.0)
    for p in [*model.decoder.layers.parameters(), *([model.decoder.mix_gate.weight] if mix == "token" else [])]:
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    window = 8
    model.decoder.window = window
    src = torch.cat([torch.tensor([d.eos()]), torch.randint(4, len(d), (28,))])
    full = stream_log_probs(model, src, window, True)
    torch.testing.assert_close(token_by_token_log_probs(model, src), full, rtol=0, atol=1e-4)
    model.decoder.mix_mode = "none"  # the same weights, the SideNet's output alone
    assert (stream_log_probs(model, src, window, True) - full).abs().max() > 1e-3


def test_a_prompt_of_three_windows_leaves_the_memory_of_the_streaming_evaluation(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model = sidenet_over_newgpt(make_sidenet, d, memory=True)
    model.memory.configure(memory_size=64)
    window = 8
    model.decoder.window = window
    tokens = torch.randint(4, len(d), (3 * window + 3,))
    src = torch.cat([torch.tensor([d.eos()]), tokens[:-1]])
    score_document(model, tokens[:3 * window], window, d.eos(), memory=True)  # the streaming evaluation ("eval")
    want = model.memory.banks["eval"]
    state = {}
    with torch.no_grad():
        model(src[None], incremental_state=state)  # three windows and 3 tokens more: the open segment is not written
    got = model.decoder.decoding_state(state).bank
    assert got is not want and got.num_tokens(0) == want.num_tokens(0) == 3 * window
    for a, b in zip(got.held(0), want.held(0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rows_of_one_batch_never_share_memory(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model = sidenet_over_newgpt(make_sidenet, d, memory=True)
    model.decoder.window = 6
    src = torch.cat([torch.full((2, 1), d.eos()), torch.randint(4, len(d), (2, 20))], dim=1)
    with torch.no_grad():
        together = model(src, incremental_state={})[0]
        alone = torch.cat([model(src[i: i + 1], incremental_state={})[0] for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_beam_2_equals_a_brute_force_beam_search_with_memory_written_mid_search(make_sidenet, make_dictionary):
    """fairseq's SequenceGenerator, beam 2, three tokens then </s>; a window of 2 writes the first segment to
    memory after the first token, so the beams' memories must follow their reordering too."""
    from fairseq.sequence_generator import SequenceGenerator

    d = make_dictionary(40)
    model = sidenet_over_newgpt(make_sidenet, d, memory=True)
    window, steps, beam = 2, 3, 2
    model.decoder.window = window
    eos = d.eos()
    generator = SequenceGenerator([model], d, beam_size=beam, max_len_b=steps, min_len=steps)
    sample = {"net_input": {"src_tokens": torch.tensor([[eos]]), "src_lengths": torch.tensor([1])}}
    hypos = generator.generate([model], sample)[0]

    def next_log_probs(seq):  # the full forward's log-probs after eos + seq
        return stream_log_probs(model, torch.tensor([eos] + seq), window, True)[-1]

    beams = [([], 0.0)]
    for _ in range(steps):  # the beams' best continuations, neither </s> nor <pad> before the last token
        candidates = []
        for seq, total in beams:
            lp = next_log_probs(seq)
            lp[[eos, d.pad()]] = -float("inf")
            candidates += [(seq + [t], total + float(lp[t])) for t in range(len(d))]
        beams = sorted(candidates, key=lambda c: -c[1])[:beam]
    finished = sorted([(seq + [eos], total + float(next_log_probs(seq)[eos])) for seq, total in beams],
                      key=lambda c: -c[1])
    assert [h["tokens"].tolist() for h in hypos] == [seq for seq, _ in finished]
    for h, (_, total) in zip(hypos, finished):
        assert abs(float(h["positional_scores"].sum()) - total) < 1e-4


def test_sampling_with_top_k_1_is_greedy_decoding(make_sidenet, make_dictionary):
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    d = make_dictionary(40)
    model = sidenet_over_newgpt(make_sidenet, d, memory=True)
    model.decoder.window = 4
    prompt = torch.randint(4, len(d), (1, 9))
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.tensor([9])}}
    kw = dict(max_len_b=16, min_len=16)
    sampled = SequenceGenerator([model], d, beam_size=1, search_strategy=search.Sampling(d, sampling_topk=1),
                                temperature=0.7, **kw)
    hypo = sampled.generate([model], sample, prefix_tokens=prompt)[0][0]["tokens"]
    seq = [d.eos()] + prompt[0].tolist()
    while len(seq) < 17:  # argmax of the full forward over the sequence so far, read in windows of 4
        lp = stream_log_probs(model, torch.tensor(seq), 4, True)[-1]
        lp[[d.eos(), d.pad()]] = -float("inf")
        seq.append(int(lp.argmax()))
    assert hypo[:-1].tolist() == seq[1:]


def test_recall_prompts_cut_from_consecutive_stretches_by_hand():
    from longmem.commands.generation_recall import build_prompts, exact_matches
    from longmem.errors import ConfigError

    ids = list(range(100, 130))  # 30 tokens: two stretches of passage 4 + filler 6
    prompts = build_prompts(ids, count=2, passage=4, filler=6, cue=2, match=2)
    assert prompts[0] == ([100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 100, 101], [102, 103])
    assert prompts[1] == ([110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 110, 111], [112, 113])
    assert exact_matches([102, 7], [102, 103]) == 1
    with pytest.raises(ConfigError, match="fewer than 4 prompts"):
        build_prompts(ids, count=4, passage=4, filler=6, cue=2, match=2)
