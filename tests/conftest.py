import os
import random
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from fairseq.data import Dictionary

import longmem  # noqa: F401  (registers the plugin)
from longmem.paths import REPO

# Helpers reach the tests as session fixtures of the same name (a test module imports nothing from here).


@pytest.fixture
def repo_data():
    """The data folder this repository ships (data/gpt2_bpe, data/icl)."""
    from longmem import paths

    return paths.DATA


class _FakeTask:
    """What a model's build_model reads of a fairseq task."""

    def __init__(self, dictionary):
        self.target_dictionary = self.source_dictionary = dictionary


def _synthetic_text(n_lines, seed):
    """Lines from a deterministic cycle over 40 words with some noise: easy to learn, hard to guess."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    lines = []
    for _ in range(n_lines):
        start = rng.randrange(40)
        lines.append(" ".join(words[(start + 3 * j) % 40] if rng.random() > 0.1 else rng.choice(words)
                              for j in range(rng.randint(8, 20))))
    return "\n".join(lines) + "\n"


def _make_dictionary(num_symbols: int) -> Dictionary:
    d = Dictionary()
    for i in range(num_symbols):
        d.add_symbol(f"w{i}", n=num_symbols - i)
    return d


@pytest.fixture
def small_dict():
    return _make_dictionary(60)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_backbone_file(tmp_path, dictionary, layers=4, embed=32, heads=4):
    """A random newgpt backbone saved as a fairseq checkpoint: (path, model)."""
    from longmem.models.newgpt import build_newgpt
    from longmem.utils.checkpoints import save_fairseq_checkpoint

    backbone = build_newgpt("newgpt-tiny", dictionary, embed_dim=embed, num_layers=layers,
                            num_attention_heads=heads, ffn_embed_dim=4 * embed, retrieval_layer_index=1).eval()
    path = tmp_path / "backbone.pt"
    save_fairseq_checkpoint(path, backbone.state_dict(),
                            cfg={"model": {"_name": "newgpt-tiny", "num_attention_heads": heads}})
    return path, backbone


@pytest.fixture
def make_sidenet(tmp_path):
    """``make_sidenet(dictionary, **cfg) -> (LongMem model, its backbone)``: 2 SideNet layers of width 32
    over a 4-layer backbone, retrieval layer 2 (memory layer 1), memory 64 tokens, k 8, chunk 2, no
    dropout; keyword arguments override the SideNet config."""
    from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet

    def build(dictionary, **kw):
        path, backbone = _tiny_backbone_file(tmp_path, dictionary)
        cfg = SideNetConfig(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4,
                            decoder_ffn_embed_dim=128, retrieval_layer_index=2, pretrained_model_path=str(path),
                            dropout=0.0, attention_dropout=0.0, memory_size=64, k=8, chunk_size=2,
                            memory_backend="torch")
        for key, value in kw.items():
            setattr(cfg, key, value)
        return TransformerLanguageModelSideNet.build_model(cfg, _FakeTask(dictionary)), backbone

    return build


@pytest.fixture
def llama(tmp_path):
    """(folder of a saved tiny random Llama, its fairseq dictionary): 4 layers, 4 query heads sharing 2
    key/value heads, rotary positions, tied embeddings."""
    transformers = pytest.importorskip("transformers")  # the [hf] extra, which `make test` installs
    d = _make_dictionary(60)
    config = transformers.LlamaConfig(vocab_size=len(d), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    d.save(str(tmp_path / "dict.txt"))
    return tmp_path / "llama", d


@pytest.fixture(scope="session")
def FakeTask():  # noqa: N802  (a class, named as one)
    return _FakeTask


@pytest.fixture(scope="session")
def make_dictionary():
    """``make_dictionary(n)``: a fairseq Dictionary of w0 .. w{n-1} (after the 4 specials)."""
    return _make_dictionary


@pytest.fixture(scope="session")
def synthetic_text():
    """``synthetic_text(n_lines, seed)``: lines cycling over 40 words with some noise."""
    return _synthetic_text


@pytest.fixture(scope="session")
def tiny_backbone_file():
    """``tiny_backbone_file(tmp_path, dictionary, layers=4, embed=32, heads=4) -> (path, model)``."""
    return _tiny_backbone_file


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two workers on two cores: one thread each, for this process and the ones it starts
        # (two torch processes with two threads each slow each other many times over)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: starts processes or trains (`pytest -m 'not slow'` skips them)")


class CLIResult(NamedTuple):
    """What ``run_cli`` returns: unpacks as ``code, out, err``."""
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, ok=False, timeout=600, cwd=REPO, env=None, program=None) -> CLIResult``: ``python ARGS`` (a
    script path or ``-m module`` and its arguments; ``program="bash"``: a shell script) from the repository's root,
    warnings silenced, output captured. ``ok=True`` fails the test, showing the output's end, when the exit code
    is not 0."""
    def run(*args, ok=False, timeout=600, cwd=REPO, env=None, program=None):
        proc = subprocess.run([program or sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
        result = CLIResult(proc.returncode, proc.stdout, proc.stderr)
        if ok and proc.returncode != 0:
            pytest.fail(f"python {' '.join(map(str, args[:3]))} ... exited {proc.returncode}:\n"
                        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return result

    return run


def _assert_one_line_error(code, err, *needles):
    """A refusal as a user should see it: a non-zero exit, no traceback, the needles in the last line."""
    assert code != 0
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)


def _save_tiny_backbone(path, dict_path: str, data: str):
    """A newgpt-tiny checkpoint (width 64, 4 layers, 4 heads, retrieval layer 2) on ``dict_path``, recording the
    data folder ``data``: what fairseq-train would have saved, untrained."""
    from longmem.models.newgpt import build_newgpt
    from longmem.utils.checkpoints import save_fairseq_checkpoint

    sizes = {"embed_dim": 64, "num_layers": 4, "num_attention_heads": 4, "ffn_embed_dim": 256,
             "retrieval_layer_index": 2}
    backbone = build_newgpt("newgpt-tiny", dict_path, **sizes)
    save_fairseq_checkpoint(path, backbone.state_dict(), cfg={"model": {"_name": "newgpt-tiny", **sizes},
                                                              "task": {"_name": "language_modeling", "data": data}})
    return backbone


@pytest.fixture(scope="session")
def save_tiny_backbone():
    """``save_tiny_backbone(path, dict_path, data) -> model``."""
    return _save_tiny_backbone


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, binarize):
    """A data-bin of three documents, a newgpt backbone and a LongMem checkpoint on its dictionary; the
    backbone records a data path that does not exist."""
    from longmem.released import write_released_style_checkpoint

    root = tmp_path_factory.mktemp("errors")
    words = [f"w{i}" for i in range(30)]
    docs = ["\n".join(" ".join(words[(d + 7 * j + i) % 30] for i in range(12)) for j in range(20)) for d in range(3)]
    (root / "docs.txt").write_text("\n\n".join(docs) + "\n")
    binarize(root / "bin", train=root / "docs.txt", test=root / "docs.txt")
    d = str(root / "bin" / "dict.txt")
    _save_tiny_backbone(root / "backbone.pt", d, "relative/path/that/is/not/here")
    write_released_style_checkpoint(str(root / "longmem.pt"), d)
    from longmem import paths

    write_released_style_checkpoint(str(root / "longmem_gpt2.pt"), paths.GPT2_DICT)  # for the ICL sets
    return root


@pytest.fixture(scope="session")
def assert_one_line_error():
    """``assert_one_line_error(code, stderr, *needles)``."""
    return _assert_one_line_error


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.fixture(scope="session")
def same_state():
    """``same_state(a, b)``: two state dicts (a memory bank's) with the same keys and every value equal, bit for bit."""
    return _same_state


@pytest.fixture(scope="session")
def binarize(run_cli):
    """``binarize(destdir, srcdict=None, train=None, valid=None, test=None) -> destdir``: ``fairseq-preprocess
    --only-source`` of the text files given (one worker; its own dictionary unless ``srcdict``)."""
    def run(destdir, srcdict=None, **splits):
        args = ["--srcdict", srcdict] if srcdict else []
        for split, path in splits.items():
            if path is not None:
                args += [f"--{split}pref", path]
        run_cli("-m", "fairseq_cli.preprocess", "--only-source", *args, "--destdir", destdir, "--workers", "1", ok=True)
        return destdir

    return run
