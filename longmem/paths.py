"""Where the data this project ships lives: ``data/`` at the repository's root.

``data/gpt2_bpe/`` (GPT-2 BPE ``encoder.json``, ``vocab.bpe`` and the fairseq GPT-2 ``dict.txt``) and
``data/icl/`` (the five in-context-learning sets in the released layout); each folder's README says
where the files come from. ``LONGMEM_DATA`` in the environment points elsewhere (e.g. for an install
that is not an editable checkout).
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("LONGMEM_DATA", os.path.join(REPO, "data"))
GPT2_BPE = os.path.join(DATA, "gpt2_bpe")
GPT2_DICT = os.path.join(GPT2_BPE, "dict.txt")
ICL = os.path.join(DATA, "icl")
