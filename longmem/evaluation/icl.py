"""In-context learning with memory, the released protocol (docs/design.md §7).

For each seed, ``k`` demonstrations are sampled from the training set for the context and ``cache_k``
more for the memory. The memory demonstrations are concatenated, tokenized, cut into whole blocks of
``memory_block`` tokens (the remainder is dropped, as released) and each block is run through the model
so that it lands in memory. Every query then runs with memory writes off: the context demonstrations
followed by the query's template up to the label. The prediction is the argmax over the whole vocabulary
at the last position, correct when the gold label starts with the decoded token (the release's rule; an
empty decoded token counts as wrong here), or, with ``scoring="labels"``, the label whose first token
scores highest.
"""
import csv
import os
import random
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

TEMPLATES = {"sentiment": "Review: {text} Sentiment: {label}. ", "subj": "Input: {text} Type: {label}. "}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    files: Tuple[str, str]  # (train, eval) relative to the data directory
    reader: str             # "tsv_header" | "digit_space" | "csv"
    labels: Tuple[str, ...]
    template: str


TASKS = {
    "sst2": TaskSpec("sst2", ("SST-2/train.tsv", "SST-2/dev.tsv"), "tsv_header", ("negative", "positive"),
                     TEMPLATES["sentiment"]),
    "sst5": TaskSpec("sst5", ("sst-5/stsa.fine.train", "sst-5/stsa.fine.dev"), "digit_space",
                     ("terrible", "bad", "okay", "good", "great"), TEMPLATES["sentiment"]),
    "mr": TaskSpec("mr", ("mr/train.csv", "mr/test.csv"), "csv", ("negative", "positive"), TEMPLATES["sentiment"]),
    "mpqa": TaskSpec("mpqa", ("mpqa/train.csv", "mpqa/test.csv"), "csv", ("negative", "positive"),
                     TEMPLATES["sentiment"]),
    "subj": TaskSpec("subj", ("subj/train.csv", "subj/test.csv"), "csv", ("subjective", "objective"),
                     TEMPLATES["subj"]),
}


def read_examples(path: str, reader: str) -> List[Tuple[str, int]]:
    """(text, label index) pairs; a malformed row is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if reader == "tsv_header":
            lines = f.read().splitlines()[1:]
            for n, line in enumerate(lines, 2):
                text, _, label = line.rpartition("\t")
                if not text or not label.strip().isdigit():
                    raise ValueError(f"{path}:{n}: expected 'sentence<TAB>label', got {line[:60]!r}")
                rows.append((text.strip(), int(label)))
        elif reader == "digit_space":
            for n, line in enumerate(f, 1):
                label, _, text = line.strip().partition(" ")
                if not label.isdigit() or not text:
                    raise ValueError(f"{path}:{n}: expected 'label text', got {line[:60]!r}")
                rows.append((text.strip(), int(label)))
        else:
            for n, row in enumerate(csv.reader(f), 1):
                if len(row) < 2 or not row[0].strip().isdigit():
                    raise ValueError(f"{path}:{n}: expected 'label,text', got {row[:2]!r}")
                rows.append((",".join(row[1:]).strip(), int(row[0])))
    return rows


def load_task(data_dir: str, task: str):
    """(spec, train examples, eval examples) with clear errors for an unknown task or another layout."""
    if task not in TASKS:
        raise ValueError(f"unknown ICL task {task!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    paths = [os.path.join(data_dir, f) for f in spec.files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{data_dir} is not in the released layout for {task}: missing {missing} "
                                f"(expected {', '.join(spec.files)})")
    return spec, read_examples(paths[0], spec.reader), read_examples(paths[1], spec.reader)


def demonstration(spec: TaskSpec, text: str, label: int) -> str:
    return spec.template.format(text=text, label=spec.labels[label])


def query_prompt(spec: TaskSpec, context: List[Tuple[str, int]], text: str) -> str:
    """The context demonstrations, then the query's template cut just before the label."""
    head = spec.template.split("{label}")[0].format(text=text).rstrip()
    return "".join(demonstration(spec, t, l) for t, l in context) + head


def sample_demonstrations(train, k: int, cache_k: int, seed: int):
    """(context, memory) demonstrations, disjoint, drawn with ``random.Random(seed)``."""
    if k + cache_k > len(train):
        raise ValueError(f"k + cache_k = {k + cache_k} exceeds the {len(train)} training examples")
    picked = random.Random(seed).sample(range(len(train)), k + cache_k)
    return [train[i] for i in picked[:k]], [train[i] for i in picked[k:]]


def memory_blocks(token_ids: List[int], block: int) -> List[List[int]]:
    """Whole blocks only: the tokens beyond the last full block are dropped, as released."""
    return [token_ids[i: i + block] for i in range(0, len(token_ids) - block + 1, block)]


@torch.no_grad()
def fill_memory(model, blocks: List[List[int]], device) -> None:
    """Run each block through a LongMem model with memory writes on, so that it lands in memory. The
    blocks' outputs are not used and memory holds the backbone's keys/values whatever was retrieved, so
    the blocks do not read memory (the release's fill reads it too: the same memory, more work)."""
    with model.memory.configured(enabled=True, writes=True, reads=False):
        for b in blocks:
            model(torch.tensor([b], device=device))


@torch.no_grad()
def predict(model, prompts: List[List[int]], pad: int, device, batch_size: int = 8) -> torch.Tensor:
    """Log-probabilities (N, V) of the next token after each prompt; prompts left-padded in batches."""
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
