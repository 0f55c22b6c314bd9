"""The owner of a LongMem model's memory: its banks, their lifecycle and its switches (docs/design.md §3).

One ``MemoryController`` per model (``model.decoder.memory``, also ``model.memory``). It knows nothing
of fairseq: the task, the scripts and the tests use this API only.

* **Slots**: named memories that never mix (the task reads training and validation streams into the
  slots ``"train"`` and ``"valid"``; evaluation scripts use ``"eval"``). ``configure(slot=...)`` picks
  the active one; ``reset(slot=..., stream=...)`` empties one (epoch starts, document starts, a new
  evaluation document).
* **Switches**: ``enabled`` (the one source of truth for "memory on", initialised from
  ``--use-external-memory``), ``writes`` (add each segment after it is read) and ``reads`` (retrieve; off
  only to fill a memory fast, since what is written never depends on what is read).
* **Settings**: ``memory_size``, ``k``, ``chunk_size``, ``backend``, ``mode`` (``"stream"``: one memory
  per batch row; ``"shared"``: one bank for all rows; ``"release"``: the release's bank, one for all
  rows with its eviction rule), ``on_device`` (keep memory on the model's GPU)
  and ``reset_at_document_boundaries``. ``configure(...)`` changes any of them and rebuilds what must
  be rebuilt; ``configured(...)`` does the same for the length of a ``with`` block.
* **Hooks**: ``retrieval_hook(fn)`` calls ``fn(queries, retrieved, query_heads)`` after every retrieval
  (diagnostics, tests): ``query_heads[h]`` is the attention's query head that head ``h`` of ``retrieved``
  answers (with grouped-query attention one retrieval per member of a key/value group).

A forward pass asks for a ``MemoryStep`` (``step(batch_size, device, doc_start)``): it reads memory for
the segment, then writes the segment, so that a segment never retrieves itself.
"""
import contextlib
import logging
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional

import torch

from longmem.errors import ConfigError
from longmem.modules.memory_bank import ChunkedMemoryBank, Retrieved, check_memory_settings

logger = logging.getLogger(__name__)

# stream: a memory per batch row (FIFO ring); shared: one bank for all rows (FIFO ring); release: one bank
# for all rows with the release's eviction rule (memory_bank.py)
MODES = ("stream", "shared", "release")
SWITCHES = ("enabled", "writes", "reads", "slot")


@dataclass(frozen=True)
class MemorySettings:
    memory_size: int
    k: int
    chunk_size: int
    backend: str = "auto"
    mode: str = "stream"
    on_device: bool = False
    reset_at_document_boundaries: bool = False
    cpu_dtype: str = "float32"  # storage of a bank on the CPU: float32, or bfloat16 under --precision bf16

    def __post_init__(self):
        check_memory_settings("memory", self.memory_size, self.k, self.chunk_size, self.backend)
        if self.mode not in MODES:
            raise ConfigError(f"memory: unknown mode {self.mode!r}; choose one of {MODES}")
        if self.cpu_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"memory: cpu_dtype must be float32 or bfloat16, got {self.cpu_dtype!r}")

    # settings a live bank cannot change without being rebuilt (empty)
    STRUCTURAL = ("memory_size", "chunk_size", "mode", "on_device", "cpu_dtype")

    @property
    def shared(self) -> bool:
        """One memory for every row (modes shared and release), not one per row."""
        return self.mode in ("shared", "release")


class MemoryController:
    def __init__(self, num_heads: int, head_dim: int, settings: MemorySettings, enabled: bool = True,
                 has_reader: bool = True):
        """``has_reader``: the model has a layer that reads this memory; without one, enabling it is refused (it
        would be written and never read)."""
        self.num_heads, self.head_dim = num_heads, head_dim
        self.settings = settings
        self.has_reader = has_reader
        self.enabled = False
        self._set_enabled(enabled)
        self.writes = True
        self.reads = True
        self.slot = "train"
        self._banks: Dict[str, ChunkedMemoryBank] = {}
        self._hooks: List[Callable] = []
        self._loaded: set = set()  # slots holding a bank given by load_bank: never swapped for an empty one

    # ------------------------------------------------------------------ configuration
    def configure(self, **changes) -> "MemoryController":
        """Change settings and switches by name; a structural change (size, chunk, mode, device) empties
        the banks, ``k`` and ``backend`` apply to the banks as they are."""
        unknown = set(changes) - {f.name for f in fields(MemorySettings)} - set(SWITCHES)
        if unknown:
            raise TypeError(f"memory: unknown setting(s) {sorted(unknown)}; known: "
                            f"{[f.name for f in fields(MemorySettings)] + list(SWITCHES)}")
        switches = {name: changes.pop(name) for name in SWITCHES if name in changes}
        changes = {name: value for name, value in changes.items() if getattr(self.settings, name) != value}
        if changes:
            new = replace(self.settings, **changes)  # validates
            if set(changes) & set(MemorySettings.STRUCTURAL):
                if self._banks:
                    logger.info("memory: settings changed %s, starting empty", changes)
                self._banks.clear()
                self._loaded.clear()
            elif "k" in changes or "backend" in changes:
                for bank in self._banks.values():
                    bank.set_search(k=new.k, backend=new.backend)
            self.settings = new
        for name, value in switches.items():
            if name == "enabled":
                self._set_enabled(value)
            else:
                setattr(self, name, str(value) if name == "slot" else bool(value))
        return self

    def _set_enabled(self, value) -> None:
        if value and not self.has_reader:
            raise ConfigError("memory: this model was built without a memory layer (no --use-external-memory), so a "
                              "memory would be written and never read; build it with --use-external-memory")
        self.enabled = bool(value)

    def check_segment(self, tokens_per_sample: int, rows: Optional[int] = 1) -> None:
        """The one rule for the segments a memory reads (the task, every command): refused in one line, a length the
        chunk size does not divide (the last tokens of every segment would never reach memory), or adds of ``rows``
        segments that the release's eviction cannot make room for (``rows=None``: no add size to check)."""
        s = self.settings
        if tokens_per_sample % s.chunk_size:
            raise ConfigError(f"--tokens-per-sample {tokens_per_sample} is not a multiple of --chunk-size {s.chunk_size}: "
                              f"memory takes whole chunks, so the last {tokens_per_sample % s.chunk_size} tokens of every "
                              f"segment would never reach it; choose a segment length that the chunk size divides")
        if s.mode == "release" and rows:
            ChunkedMemoryBank.check_release_eviction(s.memory_size, s.chunk_size, rows * tokens_per_sample)

    def snapshot(self) -> dict:
        """Every setting and switch, as ``configure`` takes them."""
        return {**{f.name: getattr(self.settings, f.name) for f in fields(MemorySettings)},
                **{name: getattr(self, name) for name in SWITCHES}}

    @contextlib.contextmanager
    def configured(self, **changes):
        """``configure(**changes)`` for the length of a ``with`` block, then the previous values back."""
        before = self.snapshot()
        self.configure(**changes)
        try:
            yield self
        finally:
            self.configure(**before)

    # ------------------------------------------------------------------ state
    @property
    def bank(self) -> Optional[ChunkedMemoryBank]:
        """The active slot's bank (None until a forward pass builds it)."""
        return self._banks.get(self.slot)

    @property
    def banks(self) -> Mapping[str, ChunkedMemoryBank]:
        """Every slot's bank, by slot name (read-only)."""
        return MappingProxyType(self._banks)

    def load_bank(self, bank: ChunkedMemoryBank, slot: Optional[str] = None) -> None:
        """Put a bank built elsewhere (e.g. ``ChunkedMemoryBank.load``) in a slot, the active one by
        default; it must hold this model's heads."""
        if (bank.num_heads, bank.head_dim) != (self.num_heads, self.head_dim):
            raise ConfigError(f"memory: the bank holds {bank.num_heads} heads of {bank.head_dim}, this model caches "
                             f"{self.num_heads} heads of {self.head_dim}")
        shared = self.settings.shared
        if bank.shared != shared:
            raise ConfigError(f"memory: the bank is {'one shared memory' if bank.shared else 'a memory per row'} but "
                              f"this model's --memory-mode {self.settings.mode} reads "
                              f"{'one shared memory' if shared else 'a memory per row'}: configure(mode=...) to match")
        self._banks[self.slot if slot is None else slot] = bank
        self._loaded.add(self.slot if slot is None else slot)

    def reset(self, slot: Optional[str] = None, stream: Optional[int] = None) -> None:
        """Empty a slot's memory (the active one by default): every stream, or one."""
        bank = self._banks.get(self.slot if slot is None else slot)
        if bank is not None:
            bank.reset(stream)

    def clear(self) -> None:
        """Forget every slot's bank."""
        self._banks.clear()
        self._loaded.clear()

    @contextlib.contextmanager
    def retrieval_hook(self, fn: Callable[[torch.Tensor, Retrieved, List[int]], None]):
        """Within the block, ``fn(queries, retrieved, query_heads)`` runs after every retrieval."""
        self._hooks.append(fn)
        try:
            yield
        finally:
            self._hooks.remove(fn)

    # ------------------------------------------------------------------ one forward pass
    def step(self, batch_size: int, device, doc_start: Optional[torch.Tensor] = None) -> "MemoryStep":
        """What one forward pass of ``batch_size`` rows does with memory. ``doc_start`` (B, T) bool: where
        a new document begins in each row (used with ``reset_at_document_boundaries``)."""
        if not self.enabled:
            return MemoryStep(self, None)
        bank = self._bank_for(batch_size, torch.device(device))
        first_new = last_new = None
        if doc_start is not None and self.settings.reset_at_document_boundaries and not bank.shared \
                and bool(doc_start.any()):
            T = doc_start.size(1)
            positions = torch.arange(T, device=doc_start.device).expand_as(doc_start)
            first_new = torch.where(doc_start, positions, T).min(1).values  # (B,), T = none
            last_new = torch.where(doc_start, positions, -1).max(1).values  # (B,), -1 = none
        return MemoryStep(self, bank, first_new, last_new)

    def stream_bank(self, batch_size: int, device) -> ChunkedMemoryBank:
        """A new, empty memory of one stream per row with these settings (the eviction rule of the mode
        included), owned by its caller: generation's memory, which rows never share."""
        return self._new_bank(batch_size, torch.device(device), shared=False)

    def _new_bank(self, batch_size: int, device: torch.device, shared: bool) -> ChunkedMemoryBank:
        s = self.settings
        on_gpu = device.type == "cuda" and s.on_device
        return ChunkedMemoryBank(
            self.num_heads, self.head_dim, s.memory_size, s.chunk_size, s.k,
            num_streams=1 if shared else batch_size, shared=shared, backend=s.backend,
            device=device if on_gpu else "cpu", dtype=torch.float16 if on_gpu else getattr(torch, s.cpu_dtype),
            eviction="release" if s.mode == "release" else "ring",
        )

    def _bank_for(self, batch_size: int, device: torch.device) -> ChunkedMemoryBank:
        s = self.settings
        shared = s.shared
        bank = self.bank
        if bank is not None and (shared or bank.num_streams == batch_size):
            return bank
        if bank is not None and self.slot in self._loaded:
            raise ConfigError(f"memory {self.slot!r}: the bank given to load_bank holds {bank.num_streams} row "
                              f"stream(s) but this batch has {batch_size} rows: read it with batches of "
                              f"{bank.num_streams} rows, or load a bank of {batch_size} streams")
        if bank is not None:
            logger.info("memory %r: batch size changed %d -> %d, starting empty per-stream memory",
                        self.slot, bank.num_streams, batch_size)
        bank = self._new_bank(batch_size, device, shared)
        self._banks[self.slot] = bank
        return bank


class MemoryStep:
    """One forward pass's use of memory: read for the segment (``reader``), then ``write`` it."""

    def __init__(self, controller: MemoryController, bank: Optional[ChunkedMemoryBank],
                 first_new: Optional[torch.Tensor] = None, last_new: Optional[torch.Tensor] = None):
        self.controller, self.bank = controller, bank
        self.first_new, self.last_new = first_new, last_new  # (B,): a row's first / last document start

    @property
    def active(self) -> bool:
        """Memory is on for this pass (the backbone must return the retrieval layer's keys/values)."""
        return self.bank is not None

    @property
    def reader(self) -> Optional[Callable[[torch.Tensor], Retrieved]]:
        """``retrieve``, or None when there is nothing to read (memory off or empty, or reads off)."""
        if self.bank is None or not self.controller.reads or not any(self.bank.filled):
            return None
        return self.retrieve

    def retrieve(self, queries: torch.Tensor, query_heads: Optional[List[int]] = None) -> Retrieved:
        """queries (B, T, H*d) -> the memory of each token; a token at or after its row's first document
        start sees none of the old document's memory. ``query_heads``: the attention's query heads these H
        queries are (default: 0 .. H-1), passed on to the hooks."""
        out = self.bank.retrieve(queries)
        dev = queries.device
        out.keys, out.values, out.mask = out.keys.to(dev), out.values.to(dev), out.mask.to(dev)
        if self.first_new is not None:
            T = queries.size(1)
            after = torch.arange(T, device=dev).view(1, T) >= self.first_new.to(dev).view(-1, 1)  # (B, T)
            out.mask = out.mask & ~after.view(after.size(0), 1, T, 1)
        if self.controller._hooks:  # nothing built on the hot path when no one listens
            heads = list(range(self.bank.num_heads)) if query_heads is None else list(query_heads)
            for fn in self.controller._hooks:
                fn(queries, out, heads)
        return out

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (B, T, H*d) of the segment just read; a row whose new document began in this
        segment keeps only that document's tokens."""
        if self.bank is None or not self.controller.writes:
            return
        start = None
        if self.last_new is not None:
            for b in torch.nonzero(self.last_new >= 0).view(-1).tolist():
                self.bank.reset(b)
            start = self.last_new.clamp(min=0)
        self.bank.add(keys, values, start=start)
