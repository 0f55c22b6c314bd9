"""The adaptation mix: long-range recall documents plus pieces of broad real text (docs/ablations.md §5).

Documents are lists of symbols (one line of an encoded file each: ``longmem-prepare-pile``'s ``encoded/*.bpe``,
``longmem-make-longrange``'s ``train.bpe``). Broad documents are cut into consecutive pieces of at most
``piece_tokens`` (the memory is emptied at each piece, as at each document), pieces are drawn at random until they
are ``share`` of all training tokens, and the whole list is shuffled at the document level. ``mix_marked`` also says
which documents are broad pieces; ``write_marks`` writes that as the ``.marks`` file beside a split that
``--distill-on marked`` reads (every token of a marked document gets the distillation term).
"""
import random
from typing import List, Tuple

Document = List[str]
SHORTEST_PIECE = 17  # a piece of 16 tokens or fewer (a document's tail) is left out


def read_documents(path: str) -> List[Document]:
    """The non-empty lines of an encoded file, as lists of symbols."""
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f if line.strip()]


def write_documents(path: str, docs: List[Document]) -> None:
    """One document a line, documents separated by an empty line (fairseq's document boundary)."""
    with open(path, "w", encoding="utf-8") as f:
        for n, doc in enumerate(docs):
            f.write(("\n" if n else "") + " ".join(doc) + "\n")


def broad_pieces(docs: List[Document], piece_tokens: int, rng: random.Random) -> List[Document]:
    """Every document cut into consecutive pieces of at most ``piece_tokens`` (short tails left out), shuffled."""
    pieces = []
    for doc in docs:
        pieces += [doc[i:i + piece_tokens] for i in range(0, len(doc), piece_tokens)
                   if len(doc[i:i + piece_tokens]) >= SHORTEST_PIECE]
    rng.shuffle(pieces)
    return pieces


def mix_marked(longrange: List[Document], broad: List[Document], share: float, piece_tokens: int = 2048,
               seed: int = 1) -> List[Tuple[Document, bool]]:
    """``longrange`` whole plus broad pieces until they are at least ``share`` of the tokens (or the broad text runs
    out), shuffled; each document with True where it is a broad piece. ``share`` 0 gives ``longrange`` in its own
    order."""
    if not 0 <= share < 1:
        raise ValueError(f"the broad share must be in [0, 1), got {share}")
    if share == 0:
        return [(doc, False) for doc in longrange]
    rng = random.Random(seed)
    docs = [(doc, False) for doc in longrange]
    wanted = share / (1 - share) * sum(map(len, longrange))
    taken = 0
    for piece in broad_pieces(broad, piece_tokens, rng):
        if taken >= wanted:
            break
        docs.append((piece, True))
        taken += len(piece)
    rng.shuffle(docs)
    return docs


def mix(longrange: List[Document], broad: List[Document], share: float, piece_tokens: int = 2048,
        seed: int = 1) -> List[Document]:
    """The documents of ``mix_marked``, without the marks."""
    return [doc for doc, _ in mix_marked(longrange, broad, share, piece_tokens, seed)]


def write_marks(path: str, marks: List[bool]) -> None:
    """One line per document, in the order of the split: 1 for a marked (broad) document, 0 otherwise."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines("1\n" if m else "0\n" for m in marks)
