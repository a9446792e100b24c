"""Losses: sampled == full softmax when every item is sampled once, log-Q, accidental hits,
the negative sampler's distribution, in-batch negatives and the N-target pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdm.model import (
    SDM,
    ModelConfig,
    NegativeSampler,
    full_softmax_loss,
    inbatch_softmax_loss,
    sampled_softmax_logits,
    sampled_softmax_loss,
    sdm_loss,
    target_pairs,
)

V, D, P = 10, 6, 5


@pytest.fixture
def vecs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    user = torch.randn(P, D, generator=g)
    items = torch.randn(V, D, generator=g)
    targets = torch.tensor([2, 5, 9, 5, 3])
    return user, items, targets


def test_sampled_equals_full_when_every_item_sampled_once(vecs) -> None:
    user, items, targets = vecs
    negatives = torch.arange(2, V)  # every real item exactly once, true items included
    # Uniform Q over V - 2 items with S = V - 2 draws: expected count 1, log-Q 0.
    sampler = NegativeSampler(torch.ones(V), num_negatives=V - 2, power=0.75)
    torch.testing.assert_close(sampler.log_q[2:], torch.zeros(V - 2), atol=1e-6, rtol=0)
    sampled = sampled_softmax_loss(user, targets, items[targets], negatives, items[negatives], sampler.log_q)
    full = full_softmax_loss(user, targets, items)
    torch.testing.assert_close(sampled, full, atol=1e-5, rtol=0)
    # And by hand: cross-entropy over items 2..V-1.
    expected = F.cross_entropy(user @ items[2:].T, targets - 2)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)


def test_accidental_hits_are_removed(vecs) -> None:
    user, items, targets = vecs
    negatives = torch.tensor([5, 2, 7, 5])
    logits = sampled_softmax_logits(user, targets, items[targets], negatives, items[negatives], torch.zeros(V))
    assert logits.shape == (P, 1 + 4)
    hits = targets.unsqueeze(1) == negatives.unsqueeze(0)
    assert torch.isneginf(logits[:, 1:][hits]).all()
    assert torch.isfinite(logits[:, 1:][~hits]).all() and torch.isfinite(logits[:, 0]).all()
    assert torch.isneginf(logits[1, 1:]).tolist() == [True, False, False, True]  # row 1's true item is 5


def test_log_q_correction_shifts_every_logit(vecs) -> None:
    user, items, targets = vecs
    negatives = torch.tensor([4, 6, 8])
    log_q = torch.linspace(-3.0, 1.0, V)
    raw = sampled_softmax_logits(user, targets, items[targets], negatives, items[negatives], torch.zeros(V))
    corrected = sampled_softmax_logits(user, targets, items[targets], negatives, items[negatives], log_q)
    shift = torch.cat([log_q[targets].unsqueeze(1), log_q[negatives].expand(P, -1)], dim=1)
    torch.testing.assert_close(corrected, raw - shift)


def test_sampler_log_q_is_log_expected_count() -> None:
    counts = torch.tensor([0.0, 50.0, 1.0, 4.0, 9.0])
    sampler = NegativeSampler(counts, num_negatives=7, power=0.5)
    q = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0]) / 6.0  # sqrt(counts), padding and OOV dropped
    torch.testing.assert_close(sampler.probs, q)
    torch.testing.assert_close(sampler.log_q[2:], torch.log(7 * q[2:]))
    torch.testing.assert_close(sampler.log_freq[2:], torch.log(counts[2:] / 14.0))


def test_sampler_never_draws_padding_or_oov_and_follows_counts_power() -> None:
    counts = torch.tensor([1000.0, 1000.0, 1.0, 16.0, 81.0, 0.0])
    sampler = NegativeSampler(counts, num_negatives=20_000, power=0.5)
    draws = sampler.sample(torch.Generator().manual_seed(0))
    assert draws.shape == (20_000,) and draws.dtype == torch.long
    assert draws.min() >= 2 and (draws != 5).all()  # count 0 is never drawn either
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    torch.testing.assert_close(freq[2:5], torch.tensor([1.0, 4.0, 9.0]) / 14.0, atol=0.02, rtol=0)
    assert torch.isfinite(sampler.log_q).all()  # count-0 items get a floor, not -inf


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.ones(2, 3),), r"counts must be 1-D"),
        ((torch.ones(2),), r"counts must be 1-D with at least 3 entries"),
        ((torch.tensor([5.0, 5.0, 0.0]),), r"no positive entry"),
        ((torch.ones(5), 0), r"num_negatives must be >= 1"),
        ((torch.ones(5), 10, -1.0), r"power must be >= 0"),
    ],
)
def test_sampler_checks(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NegativeSampler(*args)


def test_inbatch_loss_by_hand(vecs) -> None:
    user, items, targets = vecs  # targets 2, 5, 9, 5, 3: rows 1 and 3 share item 5
    log_q = torch.linspace(-2.0, 0.0, V)
    loss = inbatch_softmax_loss(user, targets, items[targets], log_q)
    logits = user @ items[targets].T - log_q[targets]
    expected = []
    for i in range(P):
        keep = [j for j in range(P) if j == i or targets[j] != targets[i]]
        expected.append(-torch.log_softmax(logits[i, keep], 0)[keep.index(i)])
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_full_softmax_never_predicts_padding_or_oov(vecs) -> None:
    user, items, targets = vecs
    items = items.clone()
    items[:2] = user.mean(0) * 100  # padding / OOV rows that would win every row
    loss = full_softmax_loss(user, targets, items)
    torch.testing.assert_close(loss, F.cross_entropy(user @ items[2:].T, targets - 2))


# -- pairs and sdm_loss -------------------------------------------------------------


def pair_batch() -> dict:
    """Session 0: items 2..7 (length 6) padded to 8; session 1: 8, 1 (OOV), 9 (length 3); session 2: one item."""
    items = torch.tensor([[2, 3, 4, 5, 6, 7, 0, 0], [8, 1, 9, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]])
    return {"seq": {"item": items}, "seq_len": torch.tensor([6, 3, 1])}


def test_n_target_pairs_stay_inside_the_session() -> None:
    rows, cols, targets, ahead = target_pairs(pair_batch(), num_targets=5)
    assert ((cols + 1 + ahead) < torch.tensor([6, 3, 1])[rows]).all()
    got = sorted(zip(rows.tolist(), cols.tolist(), targets.tolist()))
    expected = [(0, p, 2 + t) for p in range(6) for t in range(p + 1, min(p + 6, 6))]
    expected += [(1, 0, 9), (1, 1, 9)]  # the OOV target is not a pair; nothing past seq_len
    assert got == sorted(expected)
    assert len(got) == 5 + 4 + 3 + 2 + 1 + 2  # position 5 of session 0 and session 2 have no target


def test_one_target_pairs() -> None:
    rows, cols, targets, ahead = target_pairs(pair_batch(), num_targets=1)
    assert (ahead == 0).all()
    assert sorted(zip(rows.tolist(), cols.tolist(), targets.tolist())) == [
        (0, 0, 3), (0, 1, 4), (0, 2, 5), (0, 3, 6), (0, 4, 7), (1, 1, 9),
    ]  # fmt: skip


def tiny_model(variant: str) -> SDM:
    torch.manual_seed(0)
    return SDM(ModelConfig(variant=variant, item_vocab={"item": V}, user_vocab={"user": 4}, embedding_dim=D, num_heads=2))


@pytest.mark.parametrize("variant", ["PSDMMAL-N", "PSDMMA"])
@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_sdm_loss_full_is_mean_over_pairs(variant: str, decay: float) -> None:
    """Computed by hand: N = 5 for PSDMMAL-N, 1 otherwise; mean over valid pairs only,
    the target k items ahead weighted decay ** k."""
    model = tiny_model(variant)
    batch = pair_batch()
    user_vecs = torch.randn(3, 8, D)
    n = 5 if variant == "PSDMMAL-N" else 1
    items = model.all_item_vectors().detach()
    terms, weights = [], []
    for b, length in enumerate(batch["seq_len"].tolist()):
        for p in range(length):
            for t in range(p + 1, min(p + n + 1, length)):
                target = int(batch["seq"]["item"][b, t])
                if target >= 2:
                    logits = user_vecs[b, p] @ items[2:].T
                    terms.append(-torch.log_softmax(logits, 0)[target - 2])
                    weights.append(decay ** (t - p - 1))
    loss = sdm_loss(model, batch, user_vecs, loss="full", target_decay=decay)
    w = torch.tensor(weights)
    torch.testing.assert_close(loss, (torch.stack(terms) * w).sum() / w.sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sampled", "inbatch", "full"])
def test_sdm_loss_end_to_end_backward(kind: str) -> None:
    model = tiny_model("PSDMMAL-N")
    batch = pair_batch()
    batch["long"] = {"item": torch.tensor([[2, 3], [0, 0], [5, 0]])}
    batch["long_len"] = torch.tensor([2, 0, 1])
    batch["user"] = {"user": torch.tensor([2, 3, 1])}
    sampler = NegativeSampler(torch.arange(V).float(), num_negatives=16)
    loss = sdm_loss(model, batch, model(batch), loss=kind, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.item_proj.weight.grad.abs().sum() > 0


def test_sdm_loss_without_pairs_is_zero_with_graph() -> None:
    model = tiny_model("PSDMMA")
    batch = {"seq": {"item": torch.tensor([[4, 0]])}, "seq_len": torch.tensor([1]), "user": {"user": torch.tensor([2])}}
    user_vecs = model(batch)
    loss = sdm_loss(model, batch, user_vecs, loss="full")
    loss.backward()
    assert loss.item() == 0.0


def test_sdm_loss_checks() -> None:
    model = tiny_model("PSDMMA")
    batch = pair_batch()
    with pytest.raises(ValueError, match=r"loss 'sampled' needs a NegativeSampler"):
        sdm_loss(model, batch, torch.randn(3, 8, D), loss="sampled")
    with pytest.raises(ValueError, match=r"unknown loss 'bpr'"):
        sdm_loss(model, batch, torch.randn(3, 8, D), loss="bpr", sampler=NegativeSampler(torch.ones(V)))
    with pytest.raises(ValueError, match=r"target_decay must be in \(0, 1\]"):
        sdm_loss(model, batch, torch.randn(3, 8, D), loss="full", target_decay=0.0)
