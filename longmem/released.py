"""Released LongMem checkpoints: loading them, and a generator of tiny look-alikes for tests.

The released ``longmem_gpt2_medium/checkpoint_last.pt`` is a fairseq checkpoint whose config is a
legacy ``argparse.Namespace`` (docs/design.md §8) and whose state dict holds the SideNet and the whole backbone
(docs/design.md §2). ``load_longmem_checkpoint`` builds and strictly loads such a file without the backbone file
at its original path; ``write_released_style_checkpoint`` writes a small file of exactly that structure.

    python -m longmem.released --dict dict.txt --out tiny_longmem.pt
"""
import argparse
import logging
import os

import torch

from longmem import paths
from longmem.models.loading import checkpoint_kind
from longmem.utils.checkpoints import load_checkpoint_state, save_fairseq_checkpoint
from longmem.utils.cli import output_file

logger = logging.getLogger(__name__)


def load_longmem_checkpoint(path: str, data: str = None, **overrides):
    """(model, cfg, task) from a LongMem checkpoint; a clear error for anything else."""
    from fairseq import checkpoint_utils

    from longmem.models.backbone import checkpoint_model_name

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LongMem checkpoint {path!r} does not exist")
    state = load_checkpoint_state(path)
    if checkpoint_kind(state) != "longmem":
        name = checkpoint_model_name(state) or None
        raise ValueError(f"{path} is not a LongMem checkpoint: its model is {name!r}, expected "
                         f"transformer_lm_sidenet* (a newgpt backbone checkpoint is loaded with "
                         f"--pretrained-model-path instead)")
    arg_overrides = dict(overrides)
    if data is not None:
        arg_overrides["data"] = data
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=arg_overrides,
                                                                        state=state)
    return models[0], cfg, task


def write_released_style_checkpoint(out: str, dict_path: str, layers: int = 2, embed_dim: int = 64,
                                    heads: int = 4, retrieval_layer_index: int = 2, seed: int = 0,
                                    pretrained_model_path: str = "/released/gpt2_medium/checkpoint_last.pt"):
    """A LongMem checkpoint with the release's structure, small: legacy argparse config with the
    released field names, docs/design.md §2's keys (``decoder.version`` included), random weights, a backbone
    path that does not exist here."""
    from fairseq.data import Dictionary

    vocab = len(Dictionary.load(dict_path))
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    C, F_, L = embed_dim, 4 * embed_dim, 2 * layers
    sd = {}
    bb = "decoder.pretrained_model.decoder.model."
    sd[bb + "transformer.wte.weight"] = rand(vocab, C)
    for i in range(L):
        p = f"{bb}transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + rand(C), p + "ln_1.bias": rand(C)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"attn.{proj}.weight"] = rand(C, C)
        sd.update({p + "mlp.fc_in.weight": rand(F_, C), p + "mlp.fc_in.bias": rand(F_),
                   p + "mlp.fc_out.weight": rand(C, F_), p + "mlp.fc_out.bias": rand(C)})
    sd.update({bb + "transformer.ln_f.weight": 1 + rand(C), bb + "transformer.ln_f.bias": rand(C),
               bb + "lm_head.weight": rand(vocab, C), bb + "lm_head.bias": rand(vocab)})
    memory_layer = retrieval_layer_index // 2
    for i in range(layers):
        p = f"decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rand(C, C)
        sd.update({p + "fc1.weight": rand(F_, C), p + "fc1.bias": rand(F_), p + "fc2.weight": rand(C, F_),
                   p + "fc2.bias": rand(C), p + "ln_1.weight": 1 + rand(C), p + "ln_1.bias": rand(C)})
    sd[f"decoder.layers.{memory_layer}.self_attn.memory_bias"] = rand(heads) * 50
    sd.update({"decoder.layer_norm.weight": 1 + rand(C), "decoder.layer_norm.bias": rand(C),
               "decoder.embed_tokens.weight": sd[bb + "transformer.wte.weight"],
               "decoder.output_projection.weight": sd[bb + "lm_head.weight"],
               "decoder.version": torch.Tensor([3])})  # the release's decoder registers this buffer
    args = argparse.Namespace(
        arch="transformer_lm_sidenet_gpt2_small", task="language_modeling", criterion="cross_entropy",
        data=os.path.dirname(os.path.abspath(dict_path)), sample_break_mode="none", tokens_per_sample=1024,
        decoder_layers=layers, decoder_embed_dim=C, decoder_attention_heads=heads, decoder_ffn_embed_dim=F_,
        dropout=0.1, attention_dropout=0.1, pretrained_model_path=pretrained_model_path,
        retrieval_layer_index=retrieval_layer_index, layer_reduction_factor=2, reload_ptm_layer=True,
        use_external_memory=True, memory_size=65536, k=64, chunk_size=4, use_gpu_to_search=True,
        optimizer="adam", lr=[2e-4], seed=1, batch_size=8, max_tokens=None,
    )
    save_fairseq_checkpoint(out, sd, args=args)
    return sd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dict", default=paths.GPT2_DICT,
                   help="fairseq dict.txt (default: data/gpt2_bpe/dict.txt of this repository)")
    p.add_argument("--out", required=True, type=output_file)
    p.add_argument("--layers", type=int, default=2, help="SideNet layers (backbone gets twice as many)")
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    args = p.parse_args(argv)
    write_released_style_checkpoint(args.out, args.dict, args.layers, args.embed_dim, args.heads)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
