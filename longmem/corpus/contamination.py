"""The in-context-learning sets must not enter the adaptation corpus: a document that shares any run of
``N`` consecutive words with a sentence of the five ICL sets (train and evaluation files alike) is dropped.

Words are compared lower-cased, letters and digits only, with the Penn Treebank splits of the SST files undone
(``do n't`` -> ``don't``, ``it 's`` -> ``it's``) so that a review sentence matches its ordinary spelling.
Sentences shorter than ``N`` words (many MPQA phrases) cannot be checked this way and are counted as such.
"""
import os
import re
from typing import Iterable, List, Tuple

from longmem.evaluation.icl import TASKS, read_examples

N = 8
_WORD = re.compile(r"[a-z0-9]+")
_PTB = re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b")


def words(text: str) -> List[str]:
    """The comparison words of ``text``: lower-cased, apostrophes dropped, letters and digits only."""
    return _WORD.findall(_PTB.sub(r"\1", text.lower()).replace("'", "").replace("\u2019", ""))


def _shingles(ws: List[str], n: int) -> Iterable[int]:
    return (hash(tuple(ws[i:i + n])) for i in range(len(ws) - n + 1))


class IclShingles:
    """Every ``n``-word run of every ICL sentence under ``icl_dir`` (the released layout of data/icl)."""

    def __init__(self, icl_dir: str, n: int = N):
        self.n, self.hashes = n, set()
        self.sentences = self.short_sentences = 0
        for spec in TASKS.values():
            for rel in spec.files:
                for text, _ in read_examples(os.path.join(icl_dir, rel), spec.reader, len(spec.labels)):
                    ws = words(text)
                    self.sentences += 1
                    if len(ws) < n:
                        self.short_sentences += 1
                    self.hashes.update(_shingles(ws, n))

    def first_overlap(self, text: str) -> Tuple[bool, str]:
        """(whether ``text`` shares an ``n``-word run with an ICL sentence, that run)."""
        ws = words(text)
        for i in range(len(ws) - self.n + 1):
            if hash(tuple(ws[i:i + self.n])) in self.hashes:
                return True, " ".join(ws[i:i + self.n])
        return False, ""
