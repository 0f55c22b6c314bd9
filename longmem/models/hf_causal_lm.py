"""``hf_causal_lm``: a Hugging Face causal LM (Llama family) as LongMem's frozen backbone, loaded offline.

``--hf-model`` (or LongMem's ``--pretrained-model-path``) is a local folder (``config.json`` and weights)
or a ``.gguf`` file (dequantised to fp32 by ``transformers``); nothing is fetched from a hub. The model
is frozen and returns what the SideNet needs (``backbone.py``): its L+1 hidden states (Hugging Face's
``output_hidden_states``: the token embeddings, every layer's output, the last one after the final norm,
as newgpt's), the key and value projections of layer ``retrieval_layer_index`` taken at ``k_proj`` and
``v_proj``, *before* the rotary embedding (``modules/llama_sidenet_layer.py`` says why), and the rotary
``cos``/``sin`` and attention mask of the segment. SideNet layers are of its own block type.

Token ids: the fairseq dictionary of ``longmem-hf-tokens dict`` (``longmem/commands/hf_tokens.py``)
gives every token its model id as its fairseq index: ids 0-3 are fairseq's ``<s> <pad> </s> <unk>``
(for SmolLM2: ``<|endoftext|> <|im_start|> <|im_end|> <repo_name>``; the model's end of text ``</s>``
is then its ``<|im_end|>``), ids from 4 on are written as their decimal strings.
``longmem.tokenizer.Tokenizer`` encodes text into those symbols, so ``fairseq-preprocess --srcdict`` and every
command of this project read the model's own ids.
"""
import copy
import functools
import json
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model

from longmem.errors import ConfigError
from longmem.models.backbone import BackboneStates, FrozenBackbone, register_family
from longmem.models.layer_map import check_retrieval_layer_index
from longmem.modules.llama_sidenet_layer import LlamaSideNetLayer

logger = logging.getLogger(__name__)

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq's indices 0-3
SUPPORTED = ("llama",)  # model types whose blocks the SideNet reproduces


def is_hf_path(path: str) -> bool:
    return bool(path) and (path.endswith(".gguf") and os.path.isfile(path)
                           or os.path.isfile(os.path.join(path, "config.json")))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("a Hugging Face backbone needs transformers, gguf and accelerate: "
                          "pip install -e .[hf]") from None
    return transformers


def load_hf_model(path: str):
    """The causal LM of a local folder or .gguf file, in fp32, without any download."""
    tf = _transformers()
    if not is_hf_path(path):
        raise ConfigError(f"{path!r} is neither a .gguf file nor a folder with config.json")
    kwargs = dict(local_files_only=True, dtype=torch.float32)
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model


def load_hf_tokenizer(path: str):
    tf = _transformers()
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return tf.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return tf.AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclass
class HFCausalLMConfig(FairseqDataclass):
    hf_model: str = field(default="", metadata={"help": "a local Hugging Face model folder or .gguf file"})
    hf_config: str = field(default="", metadata={"help": "the model's config as JSON (recorded; builds the "
                                                        "model's shape when --hf-model is not here)"})
    retrieval_layer_index: int = field(default=17, metadata={"help": "layer whose keys/values LongMem caches"})


class HFDecoder(FairseqIncrementalDecoder):
    def __init__(self, dictionary, hf_model):
        super().__init__(dictionary)
        self.model = hf_model
        # the dictionary's <pad> index is a model id too (SmolLM2: 1 = <|im_start|>, its bos): a caller whose
        # inputs hold that id as a token and are never padded (ICL with the model's own bos) turns this off
        self.mask_padding = True

    def padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bool, True where ``tokens`` is padding."""
        if not self.mask_padding:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return tokens.eq(self.dictionary.pad())

    def forward(self, prev_output_tokens, src_lengths=None, incremental_state=None, features_only=False, **kwargs):
        """Logits of ``prev_output_tokens`` (B, S); with ``incremental_state`` only the tokens not fed before,
        the model's own key/value cache holding the rest."""
        pad = self.padding(prev_output_tokens)
        position_ids = positions(pad)
        cache = None
        if incremental_state is not None:
            cache = self.get_incremental_state(incremental_state, "past")
            if cache is None:
                cache = new_cache(self.model.config)
                self.set_incremental_state(incremental_state, "past", cache)
        done = cache.get_seq_length() if cache is not None else 0
        out = self.model.model(input_ids=prev_output_tokens[:, done:], attention_mask=(~pad).long(),
                               position_ids=position_ids[:, done:], cache=cache, use_cache=cache is not None)
        x = out.last_hidden_state
        return (x if features_only else self.model.lm_head(x)), {"attn": [None], "inner_states": None}

    def reorder_incremental_state(self, incremental_state, new_order):
        cache = self.get_incremental_state(incremental_state, "past")
        if cache is not None:
            self.set_incremental_state(incremental_state, "past", select_cache_rows(cache, new_order))

    def output_layer(self, features):
        return self.model.lm_head(features)

    def max_positions(self):
        return self.model.config.max_position_embeddings


def new_cache(config):
    """An empty Hugging Face key/value cache for a model of ``config``."""
    return _transformers().DynamicCache(config=config)


def select_cache_rows(cache, index: torch.Tensor):
    """A new Hugging Face key/value cache of the rows ``index`` of ``cache``, which is left as it was (its layers
    rebind their tensors when they change, so shallow copies of the layers are enough; one row copied to a batch
    is a broadcast view, ``take_rows``)."""
    from longmem.modules.decoding_state import take_rows

    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        if type(layer).__name__ != "DynamicLayer":
            layer.reorder_cache(index)  # a layer kind with more state than keys and values: its own rule
        elif layer.get_seq_length() > 0:
            layer.keys, layer.values = take_rows(layer.keys, index), take_rows(layer.values, index)
    return new


class _KeysAndValuesCaptured(Exception):
    """Stops a Hugging Face model's forward once the retrieval layer's keys and values are captured."""


def positions(pad: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over non-pad tokens (left padding leaves the text's positions)."""
    return (torch.cumsum((~pad).long(), dim=1) - 1).clamp(min=0)


@register_family("hf_causal_lm")
@register_model("hf_causal_lm", dataclass=HFCausalLMConfig)
class HFCausalLM(FairseqLanguageModel, FrozenBackbone):
    """A Hugging Face causal LM (Llama family) as a fairseq model and a LongMem backbone."""

    family = "hf_causal_lm"

    def __init__(self, decoder, retrieval_layer_index: int):
        super().__init__(decoder)
        config = decoder.model.config
        if config.model_type not in SUPPORTED:
            raise ConfigError(f"hf_causal_lm supports model types {SUPPORTED}, not {config.model_type!r}")
        check_retrieval_layer_index(retrieval_layer_index, config.num_hidden_layers)
        self.retrieval_layer_index = retrieval_layer_index

    # ------------------------------------------------------------ building
    @classmethod
    def build_model(cls, cfg, task):
        return cls.from_path(cfg.hf_model, task.target_dictionary, cfg.retrieval_layer_index)

    @classmethod
    def accepts_path(cls, path: str) -> bool:
        return is_hf_path(path)

    @classmethod
    def from_path(cls, path, dictionary, retrieval_layer_index):
        return cls._wrap(load_hf_model(path), dictionary, retrieval_layer_index, path)

    @classmethod
    def from_config_json(cls, config_json: str, dictionary, retrieval_layer_index):
        """The model's shape, random weights: for a LongMem checkpoint that carries the weights itself."""
        tf = _transformers()
        config = tf.AutoConfig.for_model(**json.loads(config_json))
        return cls._wrap(tf.AutoModelForCausalLM.from_config(config), dictionary, retrieval_layer_index, "config")

    @classmethod
    def _wrap(cls, hf_model, dictionary, retrieval_layer_index, where):
        vocab = hf_model.config.vocab_size
        if vocab != len(dictionary):
            raise ConfigError(f"backbone {where} has a vocabulary of {vocab} but this task's dictionary has "
                              f"{len(dictionary)}: binarize the data with the dict.txt written by "
                              f"`longmem-hf-tokens dict --model {where}`")
        return cls(HFDecoder(dictionary, hf_model.eval()), retrieval_layer_index)  # fp32: loaded so

    def config_json(self) -> str:
        config = self.hf.config.to_dict()
        config.pop("quantization_config", None)  # the weights are dequantised
        return json.dumps(config)

    # ------------------------------------------------------------ FrozenBackbone
    @property
    def hf(self):
        return self.decoder.model

    @property
    def num_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def embed_dim(self) -> int:
        return self.hf.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.hf.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf.config, "head_dim", None) or self.embed_dim // self.num_heads

    @property
    def memory_heads(self):
        return self.hf.config.num_key_value_heads, self.head_dim

    def _run(self, tokens: torch.Tensor, cache, retrieval_kv: bool, stop_at_kv: bool = False):
        """The Hugging Face model over the new tokens of ``tokens`` (those ``cache`` does not hold), with layer m's
        key/value projections captured (``retrieval_kv``; before the rotary embedding) and, with ``stop_at_kv``, the
        model stopped as soon as both are (its output then None). Returns (output, captured, pad, position_ids,
        done)."""
        pad = self.decoder.padding(tokens)  # (B, S)
        done = cache.get_seq_length() if cache is not None else 0
        position_ids = positions(pad)[:, done:]  # the new tokens'
        captured = {}
        hooks = []

        def capture(module, args, out, name):
            captured[name] = out.detach()
            if stop_at_kv and len(captured) == 2:
                raise _KeysAndValuesCaptured

        if retrieval_kv:
            attn = self.hf.model.layers[self.retrieval_layer_index].self_attn
            for name in ("k_proj", "v_proj"):  # before the rotary embedding
                hooks.append(getattr(attn, name).register_forward_hook(functools.partial(capture, name=name)))
        out = None
        try:
            out = self.hf.model(input_ids=tokens[:, done:], attention_mask=(~pad).long(), position_ids=position_ids,
                                output_hidden_states=not stop_at_kv, use_cache=cache is not None, cache=cache)
        except _KeysAndValuesCaptured:
            pass
        finally:
            for h in hooks:
                h.remove()
        return out, captured, pad, position_ids, done

    @torch.no_grad()
    def retrieval_kv_only(self, tokens: torch.Tensor):
        _, captured, *_ = self._run(tokens, None, retrieval_kv=True, stop_at_kv=True)
        return captured["k_proj"], captured["v_proj"]

    @torch.no_grad()
    def frozen_states(self, tokens: torch.Tensor, retrieval_kv: bool, cache=None) -> BackboneStates:
        out, captured, pad, position_ids, done = self._run(tokens, cache, retrieval_kv)
        hidden = [h.detach() for h in out.hidden_states]  # L + 1, of the new tokens
        cos, sin = self.hf.model.rotary_emb(hidden[0], position_ids=position_ids)  # (B, T, d)
        S = tokens.size(1)
        T = S - done
        query_at = torch.arange(done, S, device=tokens.device).view(T, 1)
        key_at = torch.arange(S, device=tokens.device).view(1, S)
        blocked = (key_at > query_at).view(1, 1, T, S) | (pad.view(-1, 1, 1, S) & (key_at != query_at))
        bias = torch.zeros(blocked.shape, dtype=hidden[0].dtype, device=tokens.device)
        bias = bias.masked_fill(blocked, torch.finfo(hidden[0].dtype).min)  # (B or 1, 1, T, T)
        kv = (captured["k_proj"], captured["v_proj"]) if retrieval_kv else None
        return BackboneStates(hidden=hidden, retrieval_kv=kv, position=(cos.detach(), sin.detach(), bias))

    def new_cache(self):
        return new_cache(self.hf.config)  # the model's own cache

    @staticmethod
    def cache_select(cache, index: torch.Tensor):
        return select_cache_rows(cache, index)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.hf.model.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf.lm_head

    @property
    def final_norm(self) -> nn.Module:
        return self.hf.model.norm

    def sidenet_final_norm(self) -> nn.Module:
        return nn.RMSNorm(self.embed_dim, eps=self.hf.config.rms_norm_eps)

    def sidenet_layer(self, ffn_embed_dim, dropout, attention_dropout, use_memory):
        c = self.hf.config
        if ffn_embed_dim != c.intermediate_size:
            raise ConfigError(f"SideNet MLP width {ffn_embed_dim} must equal the backbone's intermediate_size "
                              f"{c.intermediate_size} (--decoder-ffn-embed-dim)")
        return LlamaSideNetLayer(self.embed_dim, ffn_embed_dim, self.num_heads, c.num_key_value_heads, self.head_dim,
                                 c.rms_norm_eps, dropout, attention_dropout, use_memory)

    @torch.no_grad()
    def copy_block_into(self, block_index, layer):
        source = self.hf.model.layers[block_index]
        missing, unexpected = layer.load_state_dict(source.state_dict(), strict=False)
        assert not unexpected and all(k.endswith("memory_bias") for k in missing), (missing, unexpected)
