"""The pure math against hand-computed values."""

import math

import pytest
import torch

from emag.math import (
    attention_probs,
    blend,
    cfg,
    ema_deviation_sums,
    ema_score,
    ema_update_,
    emag_additive,
    emag_nested,
    emag_only,
    k2idx,
    merge_guided_channels,
    renormalize_rows,
    row_entropy,
    select_layers,
)
from emag.math.selection import select_layers_per_row


def test_ema_recurrence_by_hand():
    e = torch.tensor([1.0, 2.0])
    ema_update_(e, torch.tensor([3.0, 0.0]), beta=0.75)
    assert torch.allclose(e, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0]))
    ema_update_(e, torch.tensor([0.0, 0.0]), beta=0.75)
    assert torch.allclose(e, torch.tensor([1.5 * 0.75, 1.5 * 0.75]))


def test_ema_update_is_the_reference_float16_sequence():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(64, generator=g).half()
    x = torch.rand(64, generator=g)
    expected = e.clone()
    expected.mul_(0.988)
    expected.add_(x.half(), alpha=1 - 0.988)
    ema_update_(e, x, 0.988)
    assert e.dtype == torch.float16 and torch.equal(e, expected)


def test_score_is_mean_absolute_difference():
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r = torch.tensor([[1.5, 2.0], [2.0, 4.0]])
    assert ema_score(e, r).item() == pytest.approx((0.5 + 0 + 1 + 0) / 4)


def test_deviation_sums_give_the_float16_mean():
    """The streamed score (row sums of the float16 |E - R|) is the whole-tensor float16 mean."""
    g = torch.Generator().manual_seed(3)
    e = torch.rand(2, 3, 16, 20, generator=g).half()
    r = torch.rand(2, 3, 16, 20, generator=g)
    sums = ema_deviation_sums(e, r)
    assert sums.shape == (2,)
    assert torch.equal((sums.sum() / e.numel()).half(), ema_score(e, r))
    by_hand = torch.stack([(e[i].float() - r[i].half().float()).abs().half().float().sum() for i in range(2)])
    torch.testing.assert_close(sums, by_hand)


def test_blend_lambda_one_is_the_ema_and_zero_is_live():
    e, r = torch.tensor([1.0, 2.0]).half(), torch.tensor([5.0, 7.0])
    assert torch.equal(blend(e, r, 1.0), torch.tensor([1.0, 2.0]))
    assert torch.equal(blend(e, r, 0.0), r)
    assert torch.allclose(blend(e, r, 0.25), 0.25 * e.float() + 0.75 * r)
    g = torch.Generator().manual_seed(0)
    e, r = torch.rand(3, 40, generator=g).half(), torch.rand(3, 40, generator=g)
    assert torch.equal(blend(e, r, 1.0), 1.0 * e.float() + 0.0 * r)  # the literal expression, bit for bit
    e32 = e.float()
    assert blend(e32, r, 1.0).data_ptr() != e32.data_ptr()  # a copy, never the EMA itself


@pytest.mark.parametrize(
    "n, ema_steps, apply_steps",
    [
        (4, range(0, 3), range(1, 3)),
        (20, range(0, 16), range(4, 16)),
        (28, range(0, 23), range(5, 23)),
        (50, range(0, 40), range(10, 40)),
    ],
)
def test_k2idx_reproduces_the_sd3_reference_tables(n, ema_steps, apply_steps):
    start, delta, stop = k2idx(250, n), k2idx(50, n), k2idx(50, n)
    ema = [i for i in range(n) if stop <= n - 1 - i <= start]
    apply = [i for i in range(n) if stop <= n - 1 - i <= start - delta]
    assert ema == list(ema_steps) and apply == list(apply_steps)


def test_k2idx_rounds_and_clamps():
    assert k2idx(50, 28) == 5  # round(5.4)
    assert k2idx(250, 28) == 27
    assert k2idx(1000, 10) == 9 and k2idx(-5, 10) == 0
    assert k2idx(125, 2) == 0  # round(0.5) = 0: half to even, as Python's round


def test_attention_probs_both_rounding_orders_are_softmax():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    for first in (True, False):
        p = attention_probs(q, k, 0.5, first)
        assert torch.allclose(p, expected, atol=1e-6)
        assert torch.allclose(p.sum(-1), torch.ones(2, 3, 5))


def test_renormalize_rows_and_entropy_by_hand():
    rows = torch.tensor([[0.5, 0.25, 0.75]])
    assert torch.allclose(renormalize_rows(rows), rows / 1.5)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 1, 4).repeat(2, 2, 3, 1)
    p[1] = 0.25
    ent = row_entropy(p)
    assert ent.shape == (2,)
    assert ent[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert ent[1].item() == pytest.approx(math.log(4), rel=1e-6)


def test_combinations_match_their_equations():
    g = torch.Generator().manual_seed(2)
    u, c, ue, ce = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
    w, we = 7.0, 1.5
    c2 = ce + we * (c - ce)
    assert torch.allclose(emag_nested(u, c, ce, w, we), u + w * (c2 - u))
    assert torch.allclose(emag_nested(u, c, ce, w, we), u + w * (c - u) + w * (we - 1) * (c - ce))
    assert torch.allclose(emag_additive(u, c, ue, w, we), u + w * (c - u) + we * (c - ue))
    assert torch.allclose(emag_only(c, ce, we), ce + we * (c - ce))
    assert torch.allclose(emag_nested(None, c, ce, w, we), c2)
    # neutral scales are exact in floating point
    c32, ce32, u32 = c.float(), ce.float(), u.float()
    assert torch.equal(emag_nested(u32, c32, ce32, w, 1.0), cfg(u32, c32, w))
    assert torch.equal(emag_additive(u32, c32, ce32, w, 0.0), cfg(u32, c32, w))
    assert torch.equal(emag_only(c32, ce32, 1.0), c32)
    # in the model's float16, evaluated exactly as the reference writes it (docs/method.md section 5): c_e + w_e (c - c_e)
    c16, ce16, u16 = (t.half() for t in (c, ce, u))
    literal = ce16 + we * (c16 - ce16)
    assert torch.equal(emag_only(c16, ce16, we), literal)
    assert torch.equal(emag_nested(u16, c16, ce16, w, we), u16 + w * (literal - u16))
    assert torch.equal(emag_additive(u16, c16, ue.half(), w, we), u16 + w * (c16 - u16) + we * (c16 - ue.half()))


def test_merge_guided_channels_takes_the_rest_from_base():
    guided, base = torch.zeros(2, 4, 2, 2), torch.ones(2, 8, 2, 2)
    out = merge_guided_channels(guided, base, 3)
    assert out[:, :3].eq(0).all() and out[:, 3:].eq(1).all() and base.eq(1).all()


def test_adaptive_selection_ties_first_observation_and_fallback():
    layers = [6, 7, 8]
    assert select_layers(layers, {6: None, 7: None, 8: None}) == [6, 7, 8]  # nothing observed yet
    assert select_layers(layers, {6: 0.0, 7: 0.0, 8: 0.0}) == [6]  # first update: D = 0, tie -> lowest
    assert select_layers(layers, {6: 0.1, 7: 0.3, 8: 0.3}) == [7]  # tie -> lowest index
    assert select_layers(layers, {6: 0.1, 7: 0.2, 8: 0.5}) == [8]
    assert select_layers(layers, {6: 0.9, 7: 0.2, 8: 0.5}, mode="all") == [6, 7, 8]


def test_entropy_selection_modes():
    layers = [12, 13, 14, 15]
    scores = {12: 0.1, 13: 0.4, 14: 0.3, 15: 0.2}
    ent = {12: 2.0, 13: 3.0, 14: 1.0, 15: 1.0}
    assert select_layers(layers, scores, ent, mode="entropy") == [14]  # tie 14/15 -> 14
    # pool of the 2 lowest-entropy blocks {14, 15}: the larger score is 14
    assert select_layers(layers, scores, ent, mode="entropy_adaptive", top_k=2) == [14]
    assert select_layers(layers, scores, ent, mode="entropy_adaptive", top_k=5) == [13]
    with pytest.raises(ValueError):
        select_layers(layers, scores, ent, mode="bogus")


def test_per_row_selection_applies_the_rule_per_row():
    rows = {1: torch.tensor([0.1, 0.5]), 2: torch.tensor([0.3, 0.5])}
    masks = select_layers_per_row([1, 2], rows)
    assert masks[1].tolist() == [False, True] and masks[2].tolist() == [True, False]
    masks = select_layers_per_row([1, 2], {1: None, 2: None}, batch_size=3)
    assert all(m.all() for m in masks.values())
