"""A checkpoint with the release's structure (legacy argparse config, docs/design.md §2 keys, embedded backbone)
loads through fairseq's own loader, strictly, without the backbone file."""
import os

import pytest
import torch
from fairseq import checkpoint_utils

from longmem.released import load_longmem_checkpoint, write_released_style_checkpoint


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from longmem import paths

    path = tmp_path_factory.mktemp("released") / "checkpoint_last.pt"
    sd = write_released_style_checkpoint(str(path), paths.GPT2_DICT)
    return path, sd


def test_load_model_ensemble_builds_and_loads_strictly_without_the_backbone_file(released):
    path, sd = released
    raw = torch.load(path, weights_only=True)  # legacy Namespace allowed by importing longmem
    assert not os.path.exists(raw["args"].pretrained_model_path)
    models, cfg = checkpoint_utils.load_model_ensemble([str(path)])
    model = models[0]
    assert type(model).__name__ == "TransformerLanguageModelSideNet"
    own = model.state_dict()
    assert "decoder.version" in sd and set(own) == set(sd)
    for key, value in sd.items():
        assert torch.equal(own[key], value), key
    assert model.decoder.backbone_loaded
    assert model.decoder.memory_layer_index == 1 and model.decoder.cfg.use_external_memory


def test_loaded_released_model_runs_with_memory(released):
    path, _ = released
    model, cfg, task = load_longmem_checkpoint(str(path))
    model.eval()
    tokens = torch.randint(4, 1000, (1, 16))
    with torch.no_grad():
        first = model(tokens)[0]
        second = model(tokens)[0]  # now memory holds the first segment
    assert torch.isfinite(second).all()
    assert not torch.allclose(first, second)
    assert model.memory.bank.num_tokens(0) == 32


def test_a_backbone_checkpoint_is_not_a_longmem_one(tmp_path, make_dictionary):
    from longmem.models.newgpt import build_newgpt
    from longmem.utils.checkpoints import save_fairseq_checkpoint


    model = build_newgpt("newgpt-tiny", make_dictionary(20), embed_dim=32, num_layers=2, num_attention_heads=4,
                         retrieval_layer_index=1)
    save_fairseq_checkpoint(tmp_path / "bb.pt", model.state_dict(), cfg={"model": {"_name": "newgpt-tiny"}})
    with pytest.raises(ValueError, match="is not a LongMem checkpoint: its model is 'newgpt-tiny'"):
        load_longmem_checkpoint(str(tmp_path / "bb.pt"))


def test_a_checkpoint_written_before_the_version_buffer_still_loads(tmp_path):
    """This project's checkpoints from before decoder.version existed load strictly: the key is added."""
    from longmem import paths

    path = tmp_path / "old.pt"
    sd = write_released_style_checkpoint(str(path), paths.GPT2_DICT)
    state = torch.load(path, weights_only=True)
    del state["model"]["decoder.version"]
    torch.save(state, path)
    models, _ = checkpoint_utils.load_model_ensemble([str(path)])
    assert torch.equal(models[0].state_dict()["decoder.version"], torch.Tensor([3]))
    assert set(models[0].state_dict()) == set(sd)
