"""``transformer_lm_sidenet``: LongMem's language model (docs/design.md §2-§4).

A frozen backbone (``--pretrained-model-path``, any ``FrozenBackbone`` family: ``newgpt``,
``hf_causal_lm``) and a trainable residual SideNet. With ``H`` the backbone's L+1 hidden states of a segment and ``r`` the layer
reduction factor (``layer_map.py``)::

    x_0     = H[0]                                                      the backbone's token embeddings
    x_{i+1} = SideNetLayer_i(x_i) + H[r*i + r] - H[r*i]                 i = 0 .. n-1
    logits  = LayerNorm(x_n) · Wᵀ + b                                   W, b: the backbone's lm_head (b = 0 where
                                                                        it has none, e.g. Llama)

SideNet layer ``int(m / r)`` attends jointly to its local tokens and to the memory (``memory_controller.py``),
which caches the backbone's layer-``m`` keys and values: each forward reads memory, then writes the
segment, so a segment never retrieves itself.

State-dict keys are the released ones: ``decoder.layers.{i}...``, ``decoder.layers.8.self_attn.memory_bias``,
``decoder.layer_norm``, ``decoder.embed_tokens`` / ``decoder.output_projection`` (the backbone's ``wte``
and ``lm_head`` weights, shared, frozen) and the whole backbone under ``decoder.pretrained_model.``.
"""
import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from omegaconf import DictConfig, open_dict

from longmem import optim_groups, precision
from longmem.errors import ConfigError
from longmem.models.arch_defaults import arch_defaults
from longmem.models.backbone import FAMILIES, FrozenBackbone, load_backbone
from longmem.models.layer_map import LayerMap
from longmem.modules.decoding_state import DecodingState
from longmem.modules.memory_controller import MemoryController, MemorySettings, MemoryStep

logger = logging.getLogger(__name__)

MEMORY_BACKENDS = ChoiceEnum(["auto", "faiss", "torch"])
MEMORY_MODES = ChoiceEnum(["stream", "shared", "release"])
MIX_CHOICES = ("none", "constant", "token", "memory")
MIX_MODES = ChoiceEnum(list(MIX_CHOICES))
PRECISIONS = ChoiceEnum(list(precision.CHOICES))
_DEFAULT = object()  # begin_decoding's "not given"


@dataclass
class SideNetConfig(FairseqDataclass):
    decoder_embed_dim: int = field(default=1024, metadata={"help": "SideNet width (= backbone width)"})
    decoder_ffn_embed_dim: int = field(default=4096, metadata={"help": "SideNet MLP width"})
    decoder_layers: int = field(default=12, metadata={"help": "SideNet layers"})
    decoder_attention_heads: int = field(default=16, metadata={"help": "heads (= backbone heads)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on each layer's MLP output (the release drops "
                                                                  "out neither the attention output nor the input)"})
    attention_dropout: float = field(default=0.1, metadata={
        "help": "dropout on attention probabilities (in the memory layer: on the local ones only)"})
    pretrained_model_path: str = field(default="", metadata={"help": "the frozen backbone's checkpoint"})
    retrieval_layer_index: int = field(
        default=17, metadata={"help": "0-based backbone layer whose keys/values fill the memory"})
    layer_reduction_factor: int = field(
        default=2, metadata={"help": "r: SideNet layer i pairs with backbone layers r*i and r*i+r"})
    reload_ptm_layer: bool = field(
        default=False, metadata={"help": "initialise SideNet layer i from backbone layer r*i+1"})
    memory_layer_from_retrieval_block: bool = field(default=False, metadata={
        "help": "with --reload-ptm-layer, start the memory layer int(m/r) from backbone block m, whose keys fill "
                "the memory, instead of block r*int(m/r)+1 (the release; they differ for an even m)"})
    use_external_memory: bool = field(default=False, metadata={"help": "use the cached memory"})
    memory_size: int = field(default=65536, metadata={"help": "memory capacity in tokens, per stream"})
    k: int = field(default=64, metadata={"help": "memory tokens retrieved per query token"})
    chunk_size: int = field(default=4, metadata={"help": "tokens per memory chunk"})
    use_gpu_to_search: bool = field(
        default=False, metadata={"help": "keep the memory (and its search) on the model's GPU"})
    memory_backend: MEMORY_BACKENDS = field(
        default="auto", metadata={"help": "memory search: faiss, torch (exact matmul) or auto"})
    memory_mode: MEMORY_MODES = field(
        default="stream", metadata={"help": "stream: a memory per batch row (a FIFO ring, this project's default); "
                                            "shared: one ring for all rows; release: the release's memory, one "
                                            "bank for all rows with its eviction rule (the default of "
                                            "transformer_lm_sidenet_gpt2_small)"})
    share_decoder_input_output_embed: bool = field(default=False, metadata={
        "help": "accepted for the release's command line; changes nothing: the SideNet always shares the "
                "backbone's embedding and output weights, as in the release"})
    backbone_family: str = field(default="newgpt", metadata={
        "help": "recorded at build: the backbone's family (newgpt, hf_causal_lm)"})
    backbone_config: str = field(default="", metadata={
        "help": "recorded at build for backbones whose shape the SideNet's sizes do not give (JSON)"})
    no_token_positional_embeddings: bool = field(default=False, metadata={
        "help": "accepted for the release's command line; changes nothing: the SideNet has no position "
                "embeddings (the backbone's ALiBi places tokens), as in the release"})
    max_target_positions: int = field(default=2048, metadata={"help": "longest sequence to batch"})
    memory_gate_init: float = field(default=0.0, metadata={
        "help": "initial logit g of every memory head's gate; σ(g) weighs memory (0: σ = 0.5, the release's start)"})
    memory_gate_lr_scale: float = field(default=1.0, metadata={
        "help": "the gates' learning rate is the schedule's times this, in a parameter group of their own "
                "(1: one group for all parameters, as the release trains)"})
    memory_gate_no_decay: bool = field(default=False, metadata={
        "help": "no weight decay on the gates (the release decays them with every other parameter)"})
    start_as_backbone: bool = field(default=False, metadata={
        "help": "the output is the backbone's final hidden state plus a per-channel gate (starting at 0) times the "
                "SideNet's: at step 0 the model is the backbone exactly and training only adds to it (the release "
                "decodes the SideNet's output alone)"})
    output_gate_lr_scale: float = field(default=1.0, metadata={
        "help": "with --start-as-backbone: the output gate's learning rate is the schedule's times this, with no "
                "weight decay (1: the gate trains with every other parameter). Adam moves a parameter about one "
                "learning rate a step, so a gate starting at 0 stays small unless this is large"})
    mix_with_backbone: MIX_MODES = field(default="none", metadata={
        "help": "none: the next-token distribution is the SideNet's (the release); constant, token or memory: it is "
                "(1 - λ) p_backbone + λ p_SideNet, with λ = σ(b) (constant) or per token: σ(b + w·f_t) (token: f_t the "
                "SideNet's output features and each distribution's entropy and top log-prob, read without gradient; "
                "w starts at 0) or σ(b + s·(z_t - c)) (memory: z_t how strongly memory matches the token's query "
                "against its local context in the memory layer, s and c fixed by --mix-memory-slope and "
                "--mix-memory-center; σ(b) where the token reads no memory, e.g. memory off); b starts at "
                "--mix-gate-init"})
    mix_gate_init: float = field(default=0.0, metadata={
        "help": "with --mix-with-backbone: the gate's starting logit b (0: λ = 0.5)"})
    mix_memory_slope: float = field(default=1.0, metadata={
        "help": "with --mix-with-backbone memory: s, how fast λ moves with the memory evidence z_t (0: a constant "
                "mixture)"})
    mix_memory_center: float = field(default=2.0, metadata={
        "help": "with --mix-with-backbone memory: c, the evidence z_t at which λ is σ(b), the mixture without memory: "
                "above it the SideNet weighs more, below it less (z_t is the gate-weighted mean over the memory "
                "layer's heads of logsumexp(memory scores) - logsumexp(local scores))"})
    train_mix_gate_only: bool = field(default=False, metadata={
        "help": "with --mix-with-backbone: train the mixture's gate alone (b, w), the SideNet as loaded, e.g. from "
                "--restore-file of a trained LongMem checkpoint with --reset-optimizer --reset-lr-scheduler"})
    precision: PRECISIONS = field(default="fp32", metadata={
        "help": "CPU arithmetic: fp32; bf16 (the backbone in a bf16 copy, the SideNet under autocast with fp32 "
                "master weights, memory in bf16) where the CPU has native bf16, else fp32 with a warning; auto: "
                "bf16 where native. On a GPU use fairseq's --fp16 (longmem/precision.py)"})


MAX_GATE_LR_SCALE = 1e4
MAX_GATE_INIT = 20.0


class SideNetDecoder(FairseqIncrementalDecoder):
    def __init__(self, cfg: SideNetConfig, dictionary, backbone: FrozenBackbone):
        super().__init__(dictionary)
        self.cfg = cfg
        self.layer_map = LayerMap(backbone.num_layers, cfg.decoder_layers, cfg.layer_reduction_factor,
                                  cfg.retrieval_layer_index,
                                  bool(getattr(cfg, "memory_layer_from_retrieval_block", False)))
        if (backbone.embed_dim, backbone.num_heads) != (cfg.decoder_embed_dim, cfg.decoder_attention_heads):
            raise ConfigError(f"SideNet width/heads ({cfg.decoder_embed_dim}, {cfg.decoder_attention_heads}) "
                             f"must equal the backbone's ({backbone.embed_dim}, {backbone.num_heads})")
        backbone.freeze()
        self.pretrained_model = backbone
        self.embed_tokens = nn.Embedding(len(dictionary), cfg.decoder_embed_dim, dictionary.pad())
        self.embed_tokens.weight = backbone.token_embedding.weight  # shared, frozen: the released key
        self.layers = nn.ModuleList([  # the release builds the memory layer (and its gate) only with memory
            backbone.sidenet_layer(cfg.decoder_ffn_embed_dim, cfg.dropout, cfg.attention_dropout,
                                   use_memory=cfg.use_external_memory and i == self.layer_map.memory_layer)
            for i in range(cfg.decoder_layers)
        ])
        self.layer_norm = backbone.sidenet_final_norm()
        if getattr(cfg, "start_as_backbone", False):  # --start-as-backbone: features = H[L] + g ⊙ LN(x_n), g = 0
            self.output_gate = nn.Parameter(torch.zeros(cfg.decoder_embed_dim))
        self._init_mix(cfg)
        self.output_projection = nn.Linear(cfg.decoder_embed_dim, len(dictionary), bias=False)
        # shared, frozen: the released key. The logits come from the backbone's lm_head itself (output_layer)
        self.output_projection.weight = backbone.lm_head.weight
        self.register_buffer("version", torch.Tensor([3]))  # the released checkpoints carry decoder.version
        self._init_sidenet()
        if getattr(cfg, "memory_layer_from_retrieval_block", False) and not cfg.reload_ptm_layer:
            raise ConfigError("--memory-layer-from-retrieval-block chooses the backbone block the memory layer starts "
                              "from, which only --reload-ptm-layer copies: add --reload-ptm-layer or drop the flag")
        if cfg.reload_ptm_layer:
            self.reload_from_backbone()
        self._init_gates(cfg)
        heads, head_dim = backbone.memory_heads
        self.memory = MemoryController(heads, head_dim, MemorySettings(
            memory_size=cfg.memory_size, k=cfg.k, chunk_size=cfg.chunk_size, backend=str(cfg.memory_backend),
            mode=str(cfg.memory_mode), on_device=cfg.use_gpu_to_search,
        ), enabled=cfg.use_external_memory, has_reader=cfg.use_external_memory)
        self.backbone_loaded = False
        self.backbone_file = None  # the file the frozen backbone was built from (build_model sets it)
        self.window = None  # tokens per segment when decoding incrementally (build_model: --tokens-per-sample)
        precision.keep_freed_memory()
        self.set_precision(str(getattr(cfg, "precision", "fp32")))

    # ---------------------------------------------------------------- precision (longmem/precision.py)
    def set_precision(self, name: str, log: bool = True) -> None:
        """``fp32``, ``bf16`` or ``auto`` for CPU forwards from now on; memory restarts empty if its storage
        dtype changes."""
        self.autocast_dtype = precision.resolve(name, torch.device("cpu"), log=log)
        self.drop_backbone_copy()
        self.memory.configure(cpu_dtype="bfloat16" if self.autocast_dtype is not None else "float32")

    def drop_backbone_copy(self) -> None:
        """Forget the bf16 copy of the backbone (its weights changed, e.g. a checkpoint was loaded); the next
        bf16 forward makes it again. Kept outside the submodules: never saved, never trained."""
        self.__dict__["_backbone_bf16"] = None

    def _bf16(self, device: torch.device) -> bool:
        return self.autocast_dtype is not None and device.type == "cpu"

    def _frozen(self, device: torch.device) -> FrozenBackbone:
        """The backbone a forward runs: itself, or under bf16 its copy in bf16 (cast once)."""
        if not self._bf16(device):
            return self.pretrained_model
        if self.__dict__.get("_backbone_bf16") is None:
            self.__dict__["_backbone_bf16"] = copy.deepcopy(self.pretrained_model).to(torch.bfloat16).eval()
        return self.__dict__["_backbone_bf16"]

    @property
    def memory_layer_index(self) -> int:
        return self.layer_map.memory_layer

    def _init_sidenet(self):
        for name, p in self.layers.named_parameters():
            if name.endswith("memory_bias"):
                continue  # the gate starts at 0
            if p.dim() == 1:
                nn.init.ones_(p) if "ln_1.weight" in name else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def _init_mix(self, cfg):
        """--mix-with-backbone: the gate b (and w, per token) of the mixture with the backbone's distribution."""
        self.mix_mode = str(getattr(cfg, "mix_with_backbone", "none") or "none")
        if self.mix_mode not in MIX_CHOICES:
            raise ConfigError(f"--mix-with-backbone must be one of {', '.join(MIX_CHOICES)}, got {self.mix_mode!r}")
        gate_only = bool(getattr(cfg, "train_mix_gate_only", False))
        if self.mix_mode == "none":
            if gate_only:
                raise ConfigError("--train-mix-gate-only trains the gate of --mix-with-backbone, which is none: add "
                                  "--mix-with-backbone token (or constant) or drop the flag")
            return
        if getattr(cfg, "start_as_backbone", False):
            raise ConfigError("--mix-with-backbone and --start-as-backbone are two ways to keep the backbone's output; "
                              "choose one")
        init = float(getattr(cfg, "mix_gate_init", 0.0))
        if not (math.isfinite(init) and abs(init) <= MAX_GATE_INIT):
            raise ConfigError(f"--mix-gate-init must be a finite logit in [-{MAX_GATE_INIT:g}, {MAX_GATE_INIT:g}], got "
                              f"{init}")
        self.mix_bias = nn.Parameter(torch.full((1,), init))
        if self.mix_mode == "memory":
            self.mix_memory = (float(getattr(cfg, "mix_memory_slope", 1.0)), float(getattr(cfg, "mix_memory_center", 2.0)))
            if not all(math.isfinite(v) and abs(v) <= MAX_GATE_INIT for v in self.mix_memory):
                raise ConfigError(f"--mix-memory-slope and --mix-memory-center must be finite numbers in "
                                  f"[-{MAX_GATE_INIT:g}, {MAX_GATE_INIT:g}], got {self.mix_memory}")
            for layer in self.layers:  # the memory layer keeps each token's evidence (joint_attention.py)
                layer.self_attn.record_evidence = bool(getattr(layer.self_attn, "use_memory", False))
        if self.mix_mode == "token":  # input: the SideNet's features, then entropy and top log-prob of each side
            self.mix_gate = nn.Linear(cfg.decoder_embed_dim + 4, 1, bias=False)
            nn.init.zeros_(self.mix_gate.weight)
        if gate_only:
            gate = self.mix_parameters()
            for name, p in self.named_parameters():
                p.requires_grad_(name in gate)

    def mix_parameters(self) -> dict:
        """{state-dict key under the decoder: parameter} of the mixture's gate (empty without one)."""
        return {name: p for name, p in self.named_parameters() if name.startswith("mix_")}

    @torch.no_grad()
    def _init_gates(self, cfg):
        """The gates' start (--memory-gate-init) and their optimizer group (longmem/optim_groups.py)."""
        scale = float(getattr(cfg, "memory_gate_lr_scale", 1.0))
        if not (math.isfinite(scale) and 0 < scale <= MAX_GATE_LR_SCALE):
            raise ConfigError(f"--memory-gate-lr-scale must be in (0, {MAX_GATE_LR_SCALE:g}], got {scale}: it multiplies "
                              f"the learning rate of the gates (30 in the SmolLM2 recipe)")
        init = float(getattr(cfg, "memory_gate_init", 0.0))
        if not (math.isfinite(init) and abs(init) <= MAX_GATE_INIT):
            raise ConfigError(f"--memory-gate-init must be a finite logit in [-{MAX_GATE_INIT:g}, {MAX_GATE_INIT:g}], got "
                              f"{init}: σ(±{MAX_GATE_INIT:g}) is already 0 or 1 to 9 digits")
        output_scale = float(getattr(cfg, "output_gate_lr_scale", 1.0))
        if not (math.isfinite(output_scale) and 0 < output_scale <= MAX_GATE_LR_SCALE):
            raise ConfigError(f"--output-gate-lr-scale must be in (0, {MAX_GATE_LR_SCALE:g}], got {output_scale}: it "
                              f"multiplies the learning rate of --start-as-backbone's output gate")
        if getattr(self, "output_gate", None) is not None and output_scale != 1.0:
            optim_groups.request(self.output_gate, lr_scale=output_scale, no_weight_decay=True)
        for layer in self.layers:
            gate = getattr(layer.self_attn, "memory_bias", None)
            if gate is not None:
                gate.fill_(init)
                optim_groups.request(gate, lr_scale=scale, no_weight_decay=bool(getattr(cfg, "memory_gate_no_decay",
                                                                                       False)))

    @torch.no_grad()
    def reload_from_backbone(self):
        """SideNet layer i <- backbone block r*i + 1 (the release; the paper's text says r*i);
        layer_norm <- the backbone's final norm."""
        for i, layer in enumerate(self.layers):
            try:
                self.pretrained_model.copy_block_into(self.layer_map.reload_source(i), layer)
            except RuntimeError as e:  # torch's size mismatch, many lines
                detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
                raise ConfigError(f"--reload-ptm-layer: backbone block {self.layer_map.reload_source(i)} does not fit "
                                  f"SideNet layer {i} ({detail}): --decoder-embed-dim, --decoder-ffn-embed-dim and "
                                  f"--decoder-attention-heads must be the backbone's") from None
        self.layer_norm.load_state_dict(self.pretrained_model.final_norm.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.pretrained_model.eval()  # frozen backbone: always in eval mode
        return self

    # ---------------------------------------------------------------- forward
    def forward(self, prev_output_tokens, src_lengths=None, incremental_state=None, features_only=False, **kwargs):
        """Logits (B, T, V) of ``prev_output_tokens`` (B, T); with ``incremental_state`` (fairseq's convention)
        ``prev_output_tokens`` is the whole stream so far and only the tokens not fed before are run."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16(prev_output_tokens.device)):
            if incremental_state is not None:
                x, extra = self.extract_features_incremental(prev_output_tokens, incremental_state)
            else:
                x, extra = self.extract_features(prev_output_tokens, doc_start=kwargs.get("doc_start"))
            if not features_only:
                x = self.output_layer(x)
        return x, extra

    def extract_features(self, tokens, doc_start=None, **kwargs):
        """tokens (B, T); doc_start (B, T) bool, from the longmem task: where a new document begins."""
        if self.training and not self.backbone_loaded:
            raise RuntimeError(f"the backbone was never loaded: --pretrained-model-path "
                               f"{self.cfg.pretrained_model_path!r} does not exist; pass the backbone checkpoint")
        memory = self.memory.step(tokens.size(0), tokens.device, doc_start)
        bb = self._frozen(tokens.device).frozen_states(tokens, retrieval_kv=memory.active)
        x, H = self._sidenet(bb, memory, tokens.device)
        if memory.active:
            memory.write(*bb.retrieval_kv)  # after the read: a segment never retrieves itself
        return x, {"attn": [None], "inner_states": None, "backbone_features": H[-1]}

    @torch.no_grad()
    def write_memory_only(self, tokens):
        """Write ``tokens`` (B, T), one segment, into memory as a forward pass with memory on writes it, and compute
        nothing else: memory holds the frozen backbone's layer-m keys/values whatever the SideNet does, so the
        backbone runs only up to that layer and the SideNet, the reads and the output head not at all (filling memory
        with demonstrations, ``longmem.evaluation.icl.fill_memory``). Memory off or writes off: nothing."""
        memory = self.memory.step(tokens.size(0), tokens.device)
        if not memory.active or not self.memory.writes:
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16(tokens.device)):
            keys, values = self._frozen(tokens.device).retrieval_kv_only(tokens)
        memory.write(keys, values)

    def _sidenet(self, bb, memory: MemoryStep, device, caches=None):
        """The SideNet over the backbone's states ``bb`` of some tokens: (output features, the hidden states used).
        ``caches``: one key/value cache per layer (incremental decoding)."""
        H = bb.hidden
        if self._bf16(device):  # the residual stream in fp32 (layers add bf16 outputs to it), as autocast does
            H = [h.float() for h in H]
        x = H[0]  # (B, T, C)
        evidence = None
        for i, layer in enumerate(self.layers):
            a, b = self.layer_map.residual(i)
            reader = memory.reader if i == self.layer_map.memory_layer else None
            x = layer(x, H[b] - H[a], bb.position, reader, cache=None if caches is None else caches[i])
            if reader is not None and self.mix_mode == "memory":
                evidence = layer.self_attn.last_evidence
        return self.features(x, H[-1], evidence), H

    def feature_width(self) -> int:
        """Channels of ``features()``'s output."""
        C = self.cfg.decoder_embed_dim
        return {"none": C, "memory": 2 * C + 2}.get(self.mix_mode, 2 * C)

    def features(self, x, backbone_final, evidence=None):
        """The output features: LN(x_n), the release's; with --start-as-backbone H[L] + g ⊙ LN(x_n); with
        --mix-with-backbone both LN(x_n) and H[L], side by side (B, T, 2C): ``output_layer`` mixes their
        distributions; with ``memory`` then the memory layer's evidence z_t and whether the token read memory
        (``evidence``: (z, present), each (B, T); none read: zeros), (B, T, 2C + 2)."""
        x = self.layer_norm(x)
        if self.mix_mode == "memory":
            if evidence is None:
                evidence = (x.new_zeros(x.shape[:-1]), x.new_zeros(x.shape[:-1]))
            z, present = (e.to(x.dtype).unsqueeze(-1) for e in evidence)
            return torch.cat([x, backbone_final.to(x.dtype), z, present], dim=-1)
        if self.mix_mode != "none":
            return torch.cat([x, backbone_final.to(x.dtype)], dim=-1)
        gate = getattr(self, "output_gate", None)
        return x if gate is None else backbone_final + gate * x

    # ---------------------------------------------------------------- incremental decoding (docs/design.md §11)
    def begin_decoding(self, incremental_state, batch_size: int, device, window=_DEFAULT, bank=_DEFAULT) -> DecodingState:
        """Start (or restart) incremental decoding of ``batch_size`` streams. ``window``: tokens per segment
        (default ``self.window``, the task's --tokens-per-sample; None: the local context never slides).
        ``bank``: the memory to read, written at each segment's end (default: a new empty memory per row when
        memory is on, else none; pass e.g. ``model.memory.bank`` to read a memory filled before)."""
        window = self.window if window is _DEFAULT else window
        if window is not None and window < 1:
            raise ConfigError(f"decoding window must be a positive number of tokens, got {window}")
        if bank is _DEFAULT:
            bank = self.memory.stream_bank(batch_size, device) if self.memory.enabled else None
        state = DecodingState(window=window, backbone_cache=self._frozen(torch.device(device)).new_cache(),
                              layer_caches=[{} for _ in self.layers], bank=bank,
                              tokens=torch.empty(batch_size, 0, dtype=torch.long, device=device))
        self.set_incremental_state(incremental_state, "decoding", state)
        return state

    def decoding_state(self, incremental_state) -> Optional[DecodingState]:
        return self.get_incremental_state(incremental_state, "decoding")

    def extract_features_incremental(self, tokens, incremental_state):
        """Features of the tokens of ``tokens`` (B, N) not fed before, segment by segment as the full forward
        reads them: a segment that reaches the window is written to memory and the local context restarts."""
        state = self.decoding_state(incremental_state)
        if state is None:
            state = self.begin_decoding(incremental_state, tokens.size(0), tokens.device)
        new = tokens[:, state.consumed:]
        width = self.feature_width()
        out = [tokens.new_zeros(tokens.size(0), 0, width, dtype=torch.float)]
        while new.size(1):
            room = state.room
            piece, new = (new, new[:, :0]) if room is None else (new[:, :room], new[:, room:])
            out.append(self._decode_piece(piece, state))
            if state.room == 0:
                self._close_segment(state)
        return torch.cat(out, dim=1), {"attn": [None], "inner_states": None}

    def _decode_piece(self, piece, state: DecodingState):
        """The open segment's next tokens (B, t), which fit in it."""
        state.tokens = torch.cat([state.tokens, piece], dim=1)
        state.consumed += piece.size(1)
        memory = MemoryStep(self.memory, state.bank)
        bb = self._frozen(piece.device).frozen_states(state.tokens, retrieval_kv=memory.active,
                                                      cache=state.backbone_cache)
        x, _ = self._sidenet(bb, memory, piece.device, state.layer_caches)
        if memory.active and state.window is not None:
            state.pending.append(bb.retrieval_kv)
        return x.float()

    def _close_segment(self, state: DecodingState) -> None:
        """The open segment is full: into memory (as the full forward writes a segment), local context empty."""
        if state.pending:
            MemoryStep(self.memory, state.bank).write(torch.cat([k for k, _ in state.pending], dim=1),
                                                      torch.cat([v for _, v in state.pending], dim=1))
        state.pending = []
        state.tokens = state.tokens[:, :0]
        state.backbone_cache = self._frozen(state.tokens.device).new_cache()
        state.layer_caches = [{} for _ in self.layers]

    def reorder_incremental_state(self, incremental_state, new_order):
        """Beam search: every row's caches and its own memory follow ``new_order``."""
        state = self.decoding_state(incremental_state)
        if state is not None:
            self.set_incremental_state(incremental_state, "decoding",
                                       state.select(new_order, self.pretrained_model.cache_select))

    def output_layer(self, features):
        """Logits of the output features (``features()``'s). With --mix-with-backbone: the mixture's log-probabilities
        (a softmax leaves them as they are), so every caller that normalises logits reads the mixture."""
        if self.mix_mode == "none":
            return self.lm_head(features)
        side, backbone = self.mixture_components(features)
        return self.mix_log_probs(side, backbone, features)

    def mixture_components(self, features):
        """With --mix-with-backbone: (the SideNet's logits, the backbone's logits) of ``features()``'s output, the
        two distributions ``output_layer`` mixes (e.g. to score any fixed λ from one forward)."""
        if self.mix_mode == "none":
            raise ValueError("mixture_components: the model has no mixture (--mix-with-backbone none): load it with "
                             "mix_with_backbone constant, token or memory")
        C = self.cfg.decoder_embed_dim
        return self.lm_head(features[..., :C]), self.lm_head(features[..., C: 2 * C])

    def memory_evidence(self, features):
        """With --mix-with-backbone memory: (z_t, whether the token read memory), each (...), of ``features()``'s
        output."""
        if self.mix_mode != "memory":
            raise ValueError("memory_evidence: the model's mixture does not read memory (--mix-with-backbone memory)")
        C = self.cfg.decoder_embed_dim
        return features[..., 2 * C].float(), features[..., 2 * C + 1].float() > 0.5

    def lm_head(self, features):
        # The release's forward calls ``pretrained_model.decoder.model.lm_head``: weight and bias (newgpt has a
        # bias; HF Llama's lm_head has none). ``output_projection`` only carries the released state-dict key.
        # Under bf16 in autocast here too: a caller may apply it alone to features (e.g. of the last position only)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16(features.device)):
            return self._frozen(features.device).lm_head(features)

    def mix_weight_logit(self, side_lprobs, backbone_lprobs, features):
        """The gate's logit a (λ = σ(a)) at every position (..., 1). ``features``: ``features()``'s output (the
        constant and token gates need only its first C channels, the SideNet's)."""
        a = self.mix_bias.float()
        if self.mix_mode == "token":
            with torch.no_grad():  # the gate reads the two distributions; it does not move them
                stats = [-(lp.exp() * lp).sum(-1, keepdim=True) for lp in (side_lprobs, backbone_lprobs)]
                stats += [lp.max(-1, keepdim=True).values for lp in (side_lprobs, backbone_lprobs)]
                inputs = torch.cat([features[..., :self.cfg.decoder_embed_dim].float(), *stats], dim=-1)
            a = a + nn.functional.linear(inputs, self.mix_gate.weight.float())
        elif self.mix_mode == "memory":
            z, present = self.memory_evidence(features)
            slope, center = self.mix_memory
            shift = torch.where(present, slope * (z - center), torch.zeros_like(z)).unsqueeze(-1)
            return a + shift.detach()
        return a.expand(*side_lprobs.shape[:-1], 1)

    def mix_log_probs(self, side_logits, backbone_logits, features):
        """log((1 - λ) p_backbone + λ p_SideNet), in fp32; ``features`` as ``mix_weight_logit`` reads them."""
        with torch.autocast("cpu", enabled=False):
            side = torch.log_softmax(side_logits.float(), dim=-1)
            backbone = torch.log_softmax(backbone_logits.float(), dim=-1)
            a = self.mix_weight_logit(side, backbone, features)
            return torch.logaddexp(nn.functional.logsigmoid(-a) + backbone, nn.functional.logsigmoid(a) + side)

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints written before this decoder kept a ``version`` buffer lack the key: add it. A checkpoint
        trained without --mix-with-backbone, loaded with it, gets the gate's starting values (the gate-only stage
        starts from one)."""
        prefix = f"{name}." if name else ""
        state_dict.setdefault(f"{prefix}version", torch.Tensor([3]))
        for key, p in self.mix_parameters().items():
            state_dict.setdefault(prefix + key, p.detach().clone())
        return state_dict

    def max_positions(self):
        return self.cfg.max_target_positions


def build_backbone(cfg: SideNetConfig, dictionary):
    """(backbone, loaded): from --pretrained-model-path when it exists, else its shape only, from what the
    config recorded (the family and, for Hugging Face models, their config) or the SideNet's sizes."""
    backbone, loaded = load_backbone(cfg.pretrained_model_path, dictionary, cfg.retrieval_layer_index)
    if loaded:
        record = {"backbone_family": backbone.family,
                  "backbone_config": backbone.config_json() if hasattr(backbone, "config_json") else ""}
        with open_dict(cfg) if isinstance(cfg, DictConfig) else contextlib.nullcontext():
            for name, value in record.items():
                setattr(cfg, name, value)  # saved with the checkpoint: it rebuilds without the file
        return backbone, True
    # No backbone file: a LongMem checkpoint being loaded carries the backbone's weights itself.
    logger.warning("backbone file %r not found: building its shape from the checkpoint's config; its weights "
                   "must come from the LongMem checkpoint being loaded", cfg.pretrained_model_path)
    family = str(getattr(cfg, "backbone_family", "newgpt") or "newgpt")
    if family != "newgpt":
        return FAMILIES[family].from_config_json(cfg.backbone_config, dictionary, cfg.retrieval_layer_index), False
    return FAMILIES["newgpt"].with_sidenet_sizes(cfg, dictionary), False


@register_model("transformer_lm_sidenet", dataclass=SideNetConfig)
class TransformerLanguageModelSideNet(FairseqLanguageModel):
    """LongMem: frozen backbone + trainable SideNet + cached memory."""

    @classmethod
    def build_model(cls, cfg, task):
        if cfg.use_gpu_to_search and not torch.cuda.is_available():
            logger.warning("--use-gpu-to-search: no CUDA GPU here (torch.cuda.is_available() is False); the memory "
                           "stays on the CPU and is searched there")
        backbone, loaded = build_backbone(cfg, task.target_dictionary)
        decoder = SideNetDecoder(cfg, task.target_dictionary, backbone)
        decoder.backbone_loaded = loaded
        decoder.backbone_file = cfg.pretrained_model_path if loaded else None  # None: built from the config
        task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
        decoder.window = getattr(task_cfg, "tokens_per_sample", None)  # generation slides by the training segment
        return cls(decoder)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if any(k.startswith("decoder.pretrained_model.") for k in state_dict):
            self.decoder.backbone_loaded = True
            self.decoder.drop_backbone_copy()
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @property
    def memory(self) -> MemoryController:
        return self.decoder.memory


def _sidenet_arch(layers, embed, heads, ffn, retrieval_layer_index, memory_mode):
    return arch_defaults(decoder_layers=layers, decoder_embed_dim=embed, decoder_attention_heads=heads,
                         decoder_ffn_embed_dim=ffn, retrieval_layer_index=retrieval_layer_index,
                         layer_reduction_factor=2, dropout=0.1, attention_dropout=0.1, memory_mode=memory_mode)


# released: 12 layers, 1024 wide, 16 heads over newgpt-medium, the release's memory; tiny (this
# project's, for CPU): half of newgpt-tiny's 4 layers, a memory per batch row
register_model_architecture("transformer_lm_sidenet", "transformer_lm_sidenet_gpt2_small")(
    _sidenet_arch(12, 1024, 16, 4096, 17, "release"))
register_model_architecture("transformer_lm_sidenet", "transformer_lm_sidenet_tiny")(
    _sidenet_arch(2, 256, 4, 1024, 2, "stream"))
# over SmolLM2-135M (hf_causal_lm: 30 Llama layers of 576, 9 query and 3 key/value heads): 15 layers,
# memory in layer 8, which starts from backbone layer 17, whose keys fill the memory (the release's pairing;
# configs/longmem_smollm2.sh sets layer 18 with --memory-layer-from-retrieval-block: memory layer 9 from block 18)
register_model_architecture("transformer_lm_sidenet", "transformer_lm_sidenet_smollm2_135m")(
    _sidenet_arch(15, 576, 9, 1536, 17, "stream"))
