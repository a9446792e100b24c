"""The repeat (copy) head: history candidates, their merged scores, the mixture losses,
and that evaluation's chunked top-K equals a brute-force ranking of the mixture."""

from __future__ import annotations

import math

import pytest
import torch

from sdm.model.loss import NegativeSampler, sampled_softmax_loss, sdm_loss
from sdm.model.repeat import NO_COPY, History, copy_scores
from sdm.model.sdm import SDM, ModelConfig
from sdm.pipeline.scoring import ModelScorer, session_queries
from sdm.pipeline.metrics import add_copy_scores, chunked_topk
from tests.test_model import ITEM_VOCAB, USER_VOCAB, item_table, make_batch, prefix

D = 8


def repeat_model(variant: str = "PSDMMAL-N", seed: int = 0, prior: float = 0.0) -> SDM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        variant=variant, item_vocab=ITEM_VOCAB, user_vocab=USER_VOCAB, embedding_dim=D, repeat=True, repeat_prior=prior
    )
    return SDM(cfg, item_table()).eval()


def test_recency_prior_adds_prior_times_half_power_distance_plus_gate_bias_at_init() -> None:
    batch = make_batch()
    with torch.no_grad():
        _, plain = repeat_model(prior=0.0)(batch, with_history=True)
        _, primed = repeat_model(prior=2.0)(batch, with_history=True)
    T = batch["seq"]["item"].shape[1]
    readable = plain.logits > NO_COPY / 2
    for p in range(T):
        for c in range(T):  # session item c read at position p: + 2 * 0.5^(p - c) + gate bias 1
            if readable[0, p, c]:
                want = plain.logits[0, p, c] + 2.0 * 0.5 ** (p - c) + 1.0
                assert float(primed.logits[0, p, c]) == pytest.approx(float(want), abs=1e-5)
    long_ok = readable[:, :, T:]  # long-term candidates get the gate bias only
    torch.testing.assert_close(primed.logits[:, :, T:][long_ok], plain.logits[:, :, T:][long_ok] + 1.0)


def test_copy_scores_sums_repeated_items_and_drops_unreadable() -> None:
    # one query reading candidates [5, 7, 5, 0(pad), 9(unreadable)]
    h = History(
        items=torch.tensor([[5, 7, 5, 0, 9]]),
        logits=torch.tensor([[[1.0, 2.0, 3.0, NO_COPY, NO_COPY]]]),
    )
    items, r = copy_scores(h, torch.tensor([0]), torch.tensor([0]))
    got = {int(i): float(v) for i, v in zip(items[0], r[0], strict=True) if i > 1}
    assert got == pytest.approx({5: math.log(math.exp(1) + math.exp(3)), 7: 2.0})


def test_add_copy_scores_touches_only_history_items_inside_the_chunk() -> None:
    scores = torch.zeros(2, 4)  # items 10..13
    items = torch.tensor([[11, 0, 20], [13, 10, 0]])
    extra = torch.tensor([[0.0, NO_COPY, 5.0], [1.0, -1.0, NO_COPY]])
    out = add_copy_scores(scores, 10, items, extra)
    want = torch.zeros(2, 4)
    want[0, 1] = math.log(2)
    want[1, 3] = math.log(1 + math.e)
    want[1, 0] = math.log(1 + math.exp(-1))
    torch.testing.assert_close(out, want)


def test_history_is_causal_and_respects_lengths() -> None:
    model = repeat_model()
    batch = make_batch()
    with torch.no_grad():
        _, h = model(batch, with_history=True)
        T = batch["seq"]["item"].shape[1]
        for n in range(1, T + 1):  # a per-prefix pass gives the same copy logits at positions < n
            _, hp = model(prefix(batch, n), with_history=True)
            torch.testing.assert_close(hp.logits[:, :n, :n], h.logits[:, :n, :n])
            torch.testing.assert_close(hp.logits[:, :n, n:], h.logits[:, :n, T:])  # the long-term candidates
    readable = h.logits > NO_COPY / 2
    for b, (s, l) in enumerate(zip(batch["seq_len"].tolist(), batch["long_len"].tolist(), strict=True)):
        for p in range(T):
            for c in range(T):
                assert bool(readable[b, p, c]) == (c <= p and c < s)
            for c in range(batch["long"]["item"].shape[1]):
                assert bool(readable[b, p, T + c]) == (c < l)


def mixture_log_p(u: torch.Tensor, items: torch.Tensor, cand: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log P over items 2..V-1 of exp(u.v_j) + sum_c exp(r_c) [cand_c = j], by a plain loop."""
    V = items.shape[0]
    mass = torch.exp(u @ items.T)
    for c in range(len(cand)):
        if cand[c] > 1 and r[c] > NO_COPY / 2:
            mass[cand[c]] = mass[cand[c]] + torch.exp(r[c])
    mass[:2] = 0
    return torch.log(mass / mass.sum())[2:V]


def test_full_softmax_with_copy_is_the_mixture_likelihood() -> None:
    model = repeat_model("PSDMMA")
    batch = make_batch(1)
    user_vecs, h = model(batch, with_history=True)
    items = model.all_item_vectors().detach()
    terms = []
    for b, length in enumerate(batch["seq_len"].tolist()):
        for p in range(length - 1):
            y = int(batch["seq"]["item"][b, p + 1])
            log_p = mixture_log_p(user_vecs[b, p].detach(), items, h.items[b], h.logits[b, p].detach())
            terms.append(-log_p[y - 2])
    loss = sdm_loss(model, batch, user_vecs, loss="full", history=h)
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sampled", "inbatch", "full"])
def test_every_loss_with_copy_backpropagates_into_the_head(kind: str) -> None:
    model = repeat_model().train()
    batch = make_batch(2)
    sampler = NegativeSampler(torch.arange(ITEM_VOCAB["item"]).float(), num_negatives=16)
    user_vecs, h = model(batch, with_history=True)
    loss = sdm_loss(model, batch, user_vecs, loss=kind, sampler=sampler, generator=torch.Generator().manual_seed(0),
                    history=h)  # fmt: skip
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.repeat.gate.weight.grad.abs().sum() > 0 and model.repeat.long_recency.weight.grad.abs().sum() > 0


def test_sampled_softmax_with_copy_by_hand() -> None:
    """-log of (explore term + copy terms of the target) over (true, negatives, every copy term)."""
    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([3, 4])
    vecs = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([2, 3])
    log_q = torch.tensor([0.0, 0.0, 0.5, 0.25, 0.1])
    r = torch.tensor([[0.3, NO_COPY], [1.0, -2.0]])
    match = torch.tensor([[True, False], [False, True]])
    got = sampled_softmax_loss(user, targets, vecs[targets], negatives, vecs[negatives], log_q, copy=(r, match))
    want = []
    for i in range(2):
        true = float(user[i] @ vecs[targets[i]] - log_q[targets[i]])
        negs = [float(user[i] @ vecs[n] - log_q[n]) if n != targets[i] else -math.inf for n in negatives]
        copies = [float(x) for x in r[i] if x > NO_COPY / 2]
        num = math.log(math.exp(true) + sum(math.exp(float(x)) for x, m in zip(r[i], match[i]) if m))
        den = math.log(sum(math.exp(x) for x in [true, *negs, *copies]))
        want.append(den - num)
    torch.testing.assert_close(got, torch.tensor(sum(want) / 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_model_scorer_topk_equals_brute_force_mixture_ranking(chunk: int) -> None:
    model = repeat_model()
    batch = make_batch(4)
    scorer = ModelScorer(model)
    with torch.no_grad():
        state = scorer.begin_batch(batch)
        q = session_queries(batch["seq"]["item"], batch["seq_len"])
        fn = scorer.score_fn(state, q.qb, q.qp, q.prefix)
        top = chunked_topk(fn, ITEM_VOCAB["item"], 6, chunk)
        vecs, h = state
        for i in range(len(q)):
            b, p = int(q.qb[i]), int(q.qp[i])
            log_p = mixture_log_p(vecs[b, p], scorer.items, h.items[b], h.logits[b, p])
            want = (log_p.argsort(descending=True)[:6] + 2).tolist()
            assert top[i].tolist() == want
