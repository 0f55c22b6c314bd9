import os

import pytest
import torch
from fairseq.data import Dictionary

import longmem  # noqa: F401  (registers the plugin)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LONGMEM_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder {SHARED_DATA} not present (set LONGMEM_SHARED_DATA)")
    return SHARED_DATA


def make_dictionary(num_symbols: int) -> Dictionary:
    d = Dictionary()
    for i in range(num_symbols):
        d.add_symbol(f"w{i}", n=num_symbols - i)
    return d


@pytest.fixture
def small_dict():
    return make_dictionary(60)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
