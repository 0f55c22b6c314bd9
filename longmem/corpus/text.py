"""Plain-text cleaning for the broad corpus: hard-wrapped paragraphs joined into one line, light markup
(reStructuredText, AsciiDoc, POD, HTML, the Brown corpus's part-of-speech tags) removed, long texts cut into
documents at paragraph boundaries.

A paragraph is a run of non-blank lines; an indented run (a code or literal block) keeps its lines, anything
else becomes one line, as ``longmem-prepare-pile`` encodes each line of a document as one piece of text.
"""
import html
import html.parser
import re
from typing import Iterable, Iterator, List

_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^`]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`]*>)?`_+")
_RST_DIRECTIVE = re.compile(r"^\s*\.\.(\s|$)")  # directives, targets, substitutions and comments
_RULE = re.compile(r"^\s*([=\-~^*#+\"'`.:_])\1{2,}\s*$")
_POD_FORMAT = re.compile(r"[BCEFILSXZ]<{1,3}\s*([^<>]*?)\s*>{1,3}")
_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")
_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}'](?:\s|$)|n't\b|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def paragraphs(text: str) -> List[List[str]]:
    """The text's paragraphs (runs of non-blank lines), each a list of its lines without line ends."""
    out, current = [], []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def unwrap(text: str) -> str:
    """Each paragraph on one line (an indented paragraph, code or a literal block, keeps its lines),
    paragraphs separated by a blank line."""
    blocks = []
    for para in paragraphs(text):
        if len(para) > 1 and all(line[:1] in (" ", "\t") for line in para) and _looks_like_code(para):
            blocks.append("\n".join(line.strip() for line in para))
        else:
            blocks.append(re.sub(r"\s+", " ", " ".join(para)).strip())
    return "\n\n".join(blocks)


_CODE_LINE = re.compile(r"[;{}=|]|^\s*(>>>|\$ |#|//|\.\.\.|[-+*] )")


def _looks_like_code(lines: List[str]) -> bool:
    """An indented paragraph is code, a table or a literal block (its lines kept) unless it reads as
    wrapped prose: most lines of six words or more, and few with code marks."""
    code = sum(bool(_CODE_LINE.search(line)) for line in lines)
    long_lines = sum(len(line.split()) >= 6 for line in lines)
    return code * 4 >= len(lines) or long_lines * 3 < 2 * len(lines)


def strip_rst(text: str) -> str:
    """reStructuredText (Sphinx sources) to prose: directives, targets, comments and title rules removed,
    roles and links reduced to their text, ``literal`` marks dropped."""
    # a title's rule becomes a paragraph break, so the title stays a paragraph of its own
    lines = ["" if _RULE.match(line) else line for line in text.split("\n") if not _RST_DIRECTIVE.match(line)]
    text = "\n".join(lines)
    text = _RST_LINK.sub(r"\1", _RST_ROLE.sub(r"\1", text))
    return text.replace("``", "").replace("**", "")


def strip_asciidoc(text: str) -> str:
    """AsciiDoc (git's manual pages) to prose: title rules, ``[verse]``-style attributes and block fences
    removed, ``option::`` lists kept as text."""
    kept = []
    for line in text.split("\n"):
        stripped = line.strip()
        if _RULE.match(line):
            line = ""  # a title's rule: the title stays a paragraph of its own
        elif stripped.startswith("[") and stripped.endswith("]") and " " not in stripped:
            continue
        elif re.match(r"^=+ ", line):  # a one-line section title
            line = "\n" + line.lstrip("= ") + "\n"
        if stripped.startswith(("include::", "ifdef::", "endif::", "ifndef::", ":")) and stripped.endswith(("[]", ":")):
            continue
        kept.append(line)
    return "\n".join(kept).replace("$$", "").replace("``", '"').replace("''", '"')


def strip_pod(text: str) -> str:
    """Perl's POD to prose: command paragraphs (``=head1 NAME`` keeps its title), formatting codes reduced to
    their text (``C<foo>`` -> ``foo``, ``L<text|target>`` -> ``text``)."""
    kept = []
    for line in text.split("\n"):
        if line.startswith("="):
            command, _, rest = line.partition(" ")
            if command in ("=head1", "=head2", "=head3", "=head4", "=item") and rest.strip() not in ("", "*"):
                kept.extend(["", rest.strip(), ""])
            continue
        kept.append(line)
    text = "\n".join(kept)
    for _ in range(3):  # nested codes, inside out
        text = _POD_FORMAT.sub(lambda m: m.group(1).split("|")[0], text)
    return text


class _HTMLText(html.parser.HTMLParser):
    """The text of an HTML page: <script>, <style>, navigation and header/footer tables left out; block
    elements end a paragraph; <pre> keeps its lines (indented, as a literal block)."""

    BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "table", "br", "blockquote",
             "title", "section"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.skipping = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        classes = dict(attrs).get("class") or ""
        if tag in self.SKIP or "navheader" in classes or "navfooter" in classes:
            self.skipping += 1
        elif tag == "pre":
            self.pre += 1
            self.parts.append("\n\n")
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP or (tag == "div" and self.skipping):
            self.skipping = max(0, self.skipping - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.parts.append("\n\n")
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if self.pre:
            self.parts.append("\n".join("    " + line for line in data.split("\n")))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_text(page: str) -> str:
    """The prose of an HTML page (see ``_HTMLText``), paragraphs separated by blank lines."""
    parser = _HTMLText()
    parser.feed(page)
    parser.close()
    text = html.unescape("".join(parser.parts))
    return "\n\n".join(p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip())


def untag_brown(text: str) -> str:
    """A Brown corpus file (``word/tag`` tokens, one sentence per tab-indented line, paragraphs separated by
    blank lines) as ordinary text: tags dropped, ``` `` ``` and ``''`` as quotes, spaces before punctuation
    removed."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = _BROWN_TOKEN.findall(para)
        if not words:
            continue
        line = " ".join(words).replace("``", '"').replace("''", '"')
        line = _attach_quotes(line)
        out.append(_SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", line)))
    return "\n\n".join(out)


def _attach_quotes(line: str) -> str:
    """``" word "`` -> ``"word"``: an opening quote takes the next word, a closing one the previous."""
    pieces, opened = [], False
    for piece in line.split(" "):
        if piece == '"':
            if opened and pieces:
                pieces[-1] += '"'
            else:
                pieces.append('"')
            opened = not opened
            continue
        if pieces and pieces[-1] == '"' and opened:
            pieces[-1] += piece
        else:
            pieces.append(piece)
    return " ".join(pieces)


def split_long(text: str, max_words: int) -> Iterator[str]:
    """``text`` (paragraphs separated by blank lines) cut into documents of at most about ``max_words`` words,
    at paragraph boundaries."""
    current, words = [], 0
    for para in text.split("\n\n"):
        n = len(para.split())
        if current and words + n > max_words:
            yield "\n\n".join(current)
            current, words = [], 0
        current.append(para)
        words += n
    if current:
        yield "\n\n".join(current)


def group(entries: Iterable[str], words_per_document: int) -> Iterator[str]:
    """Short texts (dictionary entries, article leads) joined, in order, into documents of about
    ``words_per_document`` words."""
    current, words = [], 0
    for entry in entries:
        current.append(entry)
        words += len(entry.split())
        if words >= words_per_document:
            yield "\n\n".join(current)
            current, words = [], 0
    if current:
        yield "\n\n".join(current)
