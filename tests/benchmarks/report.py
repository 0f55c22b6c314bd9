"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""
import datetime
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "benchmarks.md")
HEADER = ("# Benchmarks\n\nWritten by the scripts in `tests/benchmarks/` (`make bench` runs them all). Each "
          "section is replaced when its script runs again. Compare ratios within one section: they come "
          "from one run on one machine, and the machines are shared and noisy.\n")


def write_section(name: str, title: str, body: str, doc: str = None) -> None:
    doc = doc or DOC
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else HEADER
    stamp = datetime.date.today().isoformat()
    section = f"<!-- {name}:start -->\n## {title}\n\nRun on {stamp}.\n\n{body}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = doc + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, doc)


def publish(lines, name: str, title: str, write: bool, doc: str = None) -> None:
    """Print a benchmark's lines and, when ``write``, put them in its section of docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(name, title, text, doc=doc)


def interleaved(fns: dict, repeats: int, warmup: int = 2, sync=lambda: None) -> dict:
    """Median seconds per call of each function, measured in rounds (one call of each per round, after
    ``warmup`` rounds) so that the drift of a shared machine falls on every column alike."""
    import statistics
    import time

    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
