"""In-context learning with memory, the release's protocol (docs/design.md §7).

For each seed, ``random.seed(seed)``, then ``k`` context demonstrations ``= random.sample(train, k)``
and ``cache_k`` memory demonstrations ``= random.sample(train, cache_k)`` (the two may overlap). Every
demonstration is encoded on its own as ``[<s>] + tokens + [</s>]`` and the encodings are concatenated.
The memory demonstrations are cut into whole blocks of ``memory_block`` tokens (the remainder is
dropped) and each block is written into memory (the backbone's layer-m keys/values: only the backbone up to that
layer runs, docs/fidelity.md E5). Each query is the context
demonstrations followed by ``[<s>] + tokens(template up to the label)``, without a final ``</s>``, run
with memory writes off. The prediction is the argmax over the whole vocabulary at the last position,
correct when the gold label starts with the decoded token (an empty decoded token is wrong), or, with
``scoring="labels"``, the label whose first token scores highest.

The files are read as the release reads them: SST-2 ``sentence<TAB>label`` after a header; SST-5, MR,
MPQA and Subj take the text as ``line[2:]`` after a one-digit label and a separator (CSV quotes kept,
Subj's outer ``"`` stripped).
"""
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

TEMPLATES = {"sentiment": "Review: {text} Sentiment: {label}. ", "subj": "Input: {text} Type: {label}. "}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    files: Tuple[str, str]  # (train, eval) relative to the data directory
    reader: str             # "sst2" | "digit" | "digit_unquote"
    labels: Tuple[str, ...]
    template: str

    @property
    def query_template(self) -> str:
        """The template cut before the label: the release's ``template[:-5]``."""
        return self.template.split(" {label}")[0]


TASKS = {
    "sst2": TaskSpec("sst2", ("SST-2/train.tsv", "SST-2/dev.tsv"), "sst2", ("negative", "positive"),
                     TEMPLATES["sentiment"]),
    "sst5": TaskSpec("sst5", ("sst-5/stsa.fine.train", "sst-5/stsa.fine.dev"), "digit",
                     ("terrible", "bad", "okay", "good", "great"), TEMPLATES["sentiment"]),
    "mr": TaskSpec("mr", ("mr/train.csv", "mr/test.csv"), "digit", ("negative", "positive"), TEMPLATES["sentiment"]),
    "mpqa": TaskSpec("mpqa", ("mpqa/train.csv", "mpqa/test.csv"), "digit", ("negative", "positive"),
                     TEMPLATES["sentiment"]),
    "subj": TaskSpec("subj", ("subj/train.csv", "subj/test.csv"), "digit_unquote", ("subjective", "objective"),
                     TEMPLATES["subj"]),
}
# the release's task names (its --task)
ALIASES = {"SST-2": "sst2", "sst-5": "sst5"}


def task_name(name: str) -> str:
    """Our name of a task given by either name (``SST-2`` or ``sst2``)."""
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown ICL task {name!r}; choose from {', '.join(TASKS)} (or the release's names "
                         f"{', '.join(ALIASES)})")
    return name


def read_examples(path: str, reader: str, num_labels: int) -> List[Tuple[str, int]]:
    """(text, label index) pairs, read as the release reads them; a malformed line or a byte that is not
    UTF-8 is an error naming the file and the line. Lines with a label and no text are kept, as the release
    keeps them (its random draws depend on every line), counted in a warning, and an error when they are
    more than ``MAX_EMPTY_SHARE`` of the file."""
    rows, empty = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                                 f"re-encode the file as UTF-8") from None
            example = _parse_example(line, reader)
            if example is None:
                continue  # the header
            text, label = example
            if label is None or label >= num_labels:
                raise ValueError(f"{path}:{n}: expected a label in 0..{num_labels - 1} and a text, got {line[:60]!r}")
            empty += not text.strip()
            rows.append((text, label))
    if empty > MAX_EMPTY_SHARE * max(1, len(rows)):
        raise ValueError(f"{path}: {empty} of {len(rows)} lines hold a label and no text: is it in the released "
                         f"layout for this task (a tab-separated text and label, or a label digit, a comma, a text)?")
    if empty:
        logger.warning("%s: %d of %d lines hold a label and no text (kept, as the release keeps them)",
                       path, empty, len(rows))
    return rows


MAX_EMPTY_SHARE = 0.05


def _parse_example(line: str, reader: str):
    """(text, label or None when malformed), or None for the SST-2 header."""
    if reader == "sst2":
        fields = line.strip("\n").split("\t")
        if len(fields) == 2 and fields[1] == "label":
            return None
        ok = len(fields) == 2 and fields[1].isdigit()
        return (fields[0], int(fields[1])) if ok else ("", None)
    label, text = line[:1], line[2:].strip("\n")
    if reader == "digit_unquote":
        text = text.strip('"')
    return text, (int(label) if label.isdigit() else None)


def load_task(data_dir: str, task: str):
    """(spec, train examples, eval examples) with clear errors for an unknown task or another layout."""
    spec = TASKS[task_name(task)]
    paths = [os.path.join(data_dir, f) for f in spec.files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{data_dir} is not in the released layout for {spec.name}: missing {missing} "
                                f"(expected {', '.join(spec.files)})")
    return (spec, *(read_examples(p, spec.reader, len(spec.labels)) for p in paths))


MAX_UNKNOWN_SHARE = 0.05


def check_known_tokens(spec: TaskSpec, train, codec, dictionary, sample: int = 200) -> int:
    """The ``<unk>`` count of the first ``sample`` demonstrations as encoded; a ValueError past
    ``MAX_UNKNOWN_SHARE`` of their tokens (a tokenizer that does not match the dictionary: every prompt
    would be mostly ``<unk>`` and the accuracies meaningless)."""
    ids = [i for text, label in train[:sample] for i in codec.encode(demonstration(spec, text, label))]
    unknown = sum(i == dictionary.unk() for i in ids)
    if unknown > MAX_UNKNOWN_SHARE * max(1, len(ids)):
        raise ValueError(f"{spec.name}: {unknown} of {len(ids)} tokens of its first {min(sample, len(train))} "
                         f"demonstrations are <unk> in this dictionary: the tokenizer does not match the dictionary "
                         f"(a model's own dict.txt needs its own tokenizer: --hf-tokenizer, --sentencepiece-model)")
    if unknown:
        logger.warning("%s: %d of %d demonstration tokens are <unk>", spec.name, unknown, len(ids))
    return unknown


def query_subset(evaluation, n: Optional[int], how: str = "first"):
    """All queries (``n`` None), the first ``n``, or ``n`` spread evenly over the list (``how="spread"``:
    indices ``floor(i * len / n)``, in order)."""
    if n is None or n >= len(evaluation):
        return evaluation
    if how == "first":
        return evaluation[:n]
    return [evaluation[i * len(evaluation) // n] for i in range(n)]


def demonstration(spec: TaskSpec, text: str, label: int) -> str:
    return spec.template.format(text=text, label=spec.labels[label])


def sample_demonstrations(train, k: int, cache_k: int, seed: int):
    """(context, memory) demonstrations as the release draws them: ``random.seed(seed)``, then
    ``random.sample(train, k)``, then ``random.sample(train, cache_k)``."""
    for name, n in (("k", k), ("cache_k", cache_k)):
        if not 0 <= n <= len(train):
            raise ValueError(f"{name} = {n} must be between 0 and the {len(train)} training examples")
    rng = random.Random(seed)
    context = rng.sample(train, k)
    return context, rng.sample(train, cache_k)


def encode_demonstrations(spec: TaskSpec, examples, encode: Callable[[str], List[int]], bos: int, eos: int) -> List[int]:
    """Each demonstration alone as ``[<s>] + tokens + [</s>]``, concatenated."""
    ids = []
    for text, label in examples:
        ids += [bos] + encode(demonstration(spec, text, label)) + [eos]
    return ids


def query_ids(spec: TaskSpec, context_ids: List[int], text: str, encode: Callable[[str], List[int]], bos: int) -> List[int]:
    """The context's encoding, then ``[<s>] + tokens(template up to the label)`` (no final ``</s>``)."""
    return context_ids + [bos] + encode(spec.query_template.format(text=text))


def memory_blocks(token_ids: List[int], block: int) -> List[List[int]]:
    """Whole blocks only: the tokens beyond the last full block are dropped, as released."""
    return [token_ids[i: i + block] for i in range(0, len(token_ids) - block + 1, block)]


def memory_to_hold(blocks: List[List[int]], chunk_size: int) -> int:
    """The least memory, in tokens, that still holds every block once all are written, whatever the eviction: the
    blocks' tokens in whole chunks, plus one chunk (the release's eviction drops the oldest chunks as soon as an add
    would reach the capacity)."""
    chunks = sum(-(-len(b) // chunk_size) for b in blocks)
    return (chunks + 1) * chunk_size


def size_memory(model, blocks: List[List[int]], floor: Optional[int]) -> None:
    """``floor`` given (``--memory-size fit``): the memory's capacity set to ``floor`` tokens (the checkpoint's), or
    more where the blocks need it, so that it holds every memory demonstration. ``floor`` None: the capacity as
    configured, and a warning where it holds only part of the blocks."""
    settings = model.memory.settings
    need = memory_to_hold(blocks, settings.chunk_size)
    if floor is not None:
        model.memory.configure(memory_size=max(floor, need))
    elif settings.memory_size < need:
        tokens = sum(len(b) for b in blocks)
        logger.warning("a memory of %d tokens holds only part of the %d tokens of memory demonstrations (the last "
                       "ones; %d would hold them all: --memory-size fit)", settings.memory_size, tokens, need)


@torch.no_grad()
def fill_memory(model, blocks: List[List[int]], device) -> None:
    """Write each block into a LongMem model's memory. The blocks' outputs are not used and memory holds the
    backbone's layer-m keys/values whatever was retrieved, so only the backbone up to that layer runs
    (``write_memory_only``; the release runs the whole model over each block, reading memory too: the same memory,
    about three times the work)."""
    with model.memory.configured(enabled=True, writes=True, reads=False):
        for b in blocks:
            model.decoder.write_memory_only(torch.tensor([b], device=device))


@torch.no_grad()
def predict(model, prompts: Sequence[List[int]], pad: int, device, batch_size: int = 1) -> torch.Tensor:
    """Log-probabilities (N, V) of the next token after each prompt; prompts left-padded in batches
    (``batch_size=1``: one at a time, as the release runs them)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        width = max(len(p) for p in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, p in enumerate(chunk):
            tokens[row, width - len(p):] = torch.tensor(p)
        logits = model(tokens.to(device))[0][:, -1]  # (b, V)
        out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def fork_state(model, incremental_state: dict, rows: int) -> dict:
    """A new incremental state holding ``rows`` copies of a one-row state, which is left as it was (every
    decoder's reordering builds new caches)."""
    forked = dict(incremental_state)
    model.decoder.reorder_incremental_state_scripting(forked, torch.zeros(rows, dtype=torch.long))
    return forked


@torch.no_grad()
def predict_cached(model, context_ids: List[int], prompts: Sequence[List[int]], pad: int, device,
                   batch_size: int = 1, head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``predict``'s log-probabilities with the shared context computed once: the context's key/value caches
    (and a LongMem model's memory reads for it) are kept and every prompt runs only its own tokens after it,
    right-padded in batches (a causal model never reads the padding after a token: no position needs marking as
    padding), the output layer applied to each prompt's last position only. A LongMem model reads the memory it holds
    (``model.memory.bank``, when memory is on) and writes nothing. ``head``: what maps those last positions' features
    (b, C) to logits, (b, V) or (b, ..., V) (default: the model's output layer; another needs a context)."""
    P = len(context_ids)
    if P == 0:
        if head is not None:
            raise ValueError("predict_cached: a head needs a shared context (with none, prompts run whole)")
        return predict(model, prompts, pad, device, batch_size)
    if any(p[:P] != context_ids for p in prompts):
        raise ValueError("predict_cached: every prompt must start with the context")
    state = {}
    if hasattr(model.decoder, "begin_decoding"):  # LongMem: one segment without end, the memory as it is
        bank = model.memory.bank if model.memory.enabled else None
        model.decoder.begin_decoding(state, 1, device, window=None, bank=bank)
    model(torch.tensor([context_ids], device=device), incremental_state=state)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        lengths = torch.tensor([len(p) - P for p in chunk])
        tokens = torch.full((len(chunk), P + int(lengths.max())), pad, dtype=torch.long)
        for row, p in enumerate(chunk):
            tokens[row, :len(p)] = torch.tensor(p)
        features = model(tokens.to(device), incremental_state=fork_state(model, state, len(chunk)),
                         features_only=True)[0]  # (b, w, C)
        last = features[torch.arange(len(chunk)), (lengths - 1).to(features.device)]  # the logits of these only
        out.append(torch.log_softmax((head or model.decoder.output_layer)(last).float(), dim=-1).cpu())
    return torch.cat(out)


def label_mass(log_probs: torch.Tensor, label_first_tokens: List[int]) -> float:
    """The mean probability the model puts on the label words' first tokens at the answer position: how much it
    still answers with a label word at all, whichever label it prefers."""
    return float(log_probs[:, label_first_tokens].exp().sum(-1).mean()) if len(log_probs) else 0.0


def score(log_probs: torch.Tensor, golds: List[int], spec: TaskSpec, decode: Callable[[int], str],
          label_first_tokens: List[int], scoring: str) -> float:
    """Accuracy: "vocab" (released: argmax over everything, gold label starts with the decoded token)
    or "labels" (the label whose first token is most likely)."""
    correct = 0
    for lp, gold in zip(log_probs, golds):
        if scoring == "labels":
            correct += int(int(torch.argmax(lp[label_first_tokens])) == gold)
        else:
            word = decode(int(lp.argmax())).strip()
            correct += int(bool(word) and spec.labels[gold].startswith(word))
    return correct / max(1, len(golds))


def prompts_for_seed(spec: TaskSpec, train, queries, codec, dictionary, k: int, cache_k: int, seed: int,
                     memory_block: int, with_context: bool = False):
    """(memory blocks, query prompts) of one seed, as dictionary indices; ``with_context``: also the context's
    ids, with which every prompt begins."""
    context, memory = sample_demonstrations(train, k, cache_k, seed)
    bos, eos = getattr(codec, "bos", dictionary.bos()), getattr(codec, "eos", dictionary.eos())
    context_ids = encode_demonstrations(spec, context, codec.encode, bos, eos)
    blocks = memory_blocks(encode_demonstrations(spec, memory, codec.encode, bos, eos), memory_block)
    prompts = [query_ids(spec, context_ids, text, codec.encode, bos) for text, _ in queries]
    return (blocks, prompts, context_ids) if with_context else (blocks, prompts)


def seed_log_probs(model, mode: str, spec: TaskSpec, train, evaluation, codec, dictionary, device, seed: int, k: int,
                   cache_k: int, memory_block: int, batch_size: int, cached: bool = True,
                   head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   memory_floor: Optional[int] = None) -> torch.Tensor:
    """The next-token log-probabilities (N, V) after each query of one seed, in one mode: memory emptied, then
    filled with the seed's memory demonstrations for "memory-on". ``head``: as ``predict_cached``'s (needs
    ``cached``). ``memory_floor``: as ``size_memory``'s ``floor`` (None: the memory as configured)."""
    blocks, prompts, context = prompts_for_seed(spec, train, evaluation, codec, dictionary, k, cache_k, seed,
                                                memory_block, with_context=True)
    if mode != "backbone":
        model.memory.configure(enabled=(mode == "memory-on"))
        model.memory.reset()
    if mode == "memory-on":
        if not blocks:
            raise ValueError(f"{cache_k} memory demonstrations of {spec.name} fill no whole block of {memory_block} "
                             f"tokens: memory would stay empty; raise --cache-k or lower --memory-block")
        size_memory(model, blocks, memory_floor)
        fill_memory(model, blocks, device)
    if cached:
        return predict_cached(model, context, prompts, dictionary.pad(), device, batch_size, head=head)
    if head is not None:
        raise ValueError("seed_log_probs: a head needs the cached context (cached=True)")
    return predict(model, prompts, dictionary.pad(), device, batch_size)


def evaluate(model, mode: str, spec: TaskSpec, train, evaluation, codec, dictionary, device, seeds, k: int,
             cache_k: int, memory_block: int, batch_size: int, scoring: str, label_tokens,
             on_seed: Optional[Callable[[int, float], None]] = None, cached: bool = True,
             masses: Optional[List[float]] = None, memory_floor: Optional[int] = None) -> List[float]:
    """Accuracy per seed of one model in one mode ("backbone", "memory-off", "memory-on");
    ``on_seed(seed, accuracy)`` after each seed. ``cached``: the context demonstrations computed once per seed
    (``predict_cached``); False: every prompt run whole (``predict``, the reference). ``masses``: a list that
    receives each seed's ``label_mass``. ``memory_floor``: as ``seed_log_probs``'s."""
    from tqdm import tqdm

    accs = []
    for seed in tqdm(seeds, desc=f"{spec.name} {mode}", unit="seed"):
        lp = seed_log_probs(model, mode, spec, train, evaluation, codec, dictionary, device, seed, k, cache_k,
                            memory_block, batch_size, cached, memory_floor=memory_floor)
        acc = score(lp, [gold for _, gold in evaluation], spec, codec.decode, label_tokens, scoring)
        if masses is not None:
            masses.append(label_mass(lp, label_tokens))
        if on_seed is not None:
            on_seed(seed, acc)
        accs.append(acc)
    return accs
