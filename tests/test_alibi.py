"""ALiBi slopes and bias against docs/design.md §1's rule, written out independently here."""
import math

import pytest
import torch

from longmem.modules.alibi import alibi_attention_bias, alibi_slopes, token_positions


def spec_slopes(H):
    """docs/design.md §1: 2^(-8h/H) for a power of two; else the slopes of the nearest lower power of two n,
    then the odd-indexed (1st, 3rd, ...) slopes of 2n."""
    if H & (H - 1) == 0:
        return [2 ** (-8 * h / H) for h in range(1, H + 1)]
    n = 1 << (H.bit_length() - 1)
    first = [2 ** (-8 * h / n) for h in range(1, n + 1)]
    twice = [2 ** (-8 * h / (2 * n)) for h in range(1, 2 * n + 1, 2)]
    return first + twice[: H - n]


@pytest.mark.parametrize("H", [8, 12, 16, 20, 25])
def test_slopes_follow_the_spec_rule(H):
    got = alibi_slopes(H)
    assert len(got) == H
    assert got == pytest.approx(spec_slopes(H), rel=1e-12)


def test_slopes_for_sixteen_heads_by_hand():
    # 2^(-0.5), 2^(-1), ..., 2^(-8)
    assert alibi_slopes(16) == pytest.approx([2 ** (-h / 2) for h in range(1, 17)])


def test_bias_is_minus_slope_times_distance_with_causal_mask():
    slopes = torch.tensor(alibi_slopes(4))
    pos = torch.arange(5)
    bias = alibi_attention_bias(slopes, pos, pos)[0]  # (H, T, S)
    for h in range(4):
        for i in range(5):
            for j in range(5):
                if j <= i:
                    assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))
                else:
                    assert bias[h, i, j].item() == torch.finfo(torch.float32).min


def test_released_form_slope_times_key_position_gives_the_same_softmax():
    slopes = torch.tensor(alibi_slopes(8))
    scores = torch.randn(8, 6, 6)
    pos = torch.arange(6)
    ours = torch.softmax(scores + alibi_attention_bias(slopes, pos, pos)[0], -1)
    released = scores + slopes.view(8, 1, 1) * pos.view(1, 1, 6)
    released = released.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(ours, torch.softmax(released, -1))


def test_positions_count_only_real_tokens():
    pad = 1
    tokens = torch.tensor([[pad, pad, 5, 6, 7], [5, 6, 7, 8, 9]])
    assert token_positions(tokens, pad).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
