"""SDM model: encoder shapes, every variant's forward/backward, causal one-pass == per-prefix,
padding invariance, item tower, constructor checks. Tiny tensors, CPU, fixed seeds."""

from __future__ import annotations

import pytest
import torch

from sdm.model import (
    SDM,
    EmbeddingBank,
    GatedFusion,
    LongTermEncoder,
    ModelConfig,
    ShortTermEncoder,
    UserAttention,
)

VARIANTS = ["SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS", "DNN", "SASRec"]
ITEM_VOCAB = {"item": 12, "category": 5, "brand": 4}
USER_VOCAB = {"user": 7, "age": 4}
B, T, L, D = 4, 6, 5, 8


def item_table() -> torch.Tensor:
    """Item i has category 2 + i % 3 and brand 2 + i % 2; padding and OOV map to 0 and 1."""
    i = torch.arange(ITEM_VOCAB["item"])
    table = torch.stack([i, 2 + i % 3, 2 + i % 2], dim=1)
    table[0], table[1] = 0, 1
    return table


def make_batch(seed: int = 0) -> dict:
    """Sessions of lengths 6, 3, 1, 2 (one of length 1); long-term lengths 5, 0, 2, 0."""
    g = torch.Generator().manual_seed(seed)
    seq_len = torch.tensor([6, 3, 1, 2])
    long_len = torch.tensor([5, 0, 2, 0])
    table = item_table()

    def events(n: int, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        items = torch.randint(2, ITEM_VOCAB["item"], (B, n), generator=g)
        items[torch.arange(n) >= lengths.unsqueeze(1)] = 0
        feats = table[items]  # (B, n, 3)
        return {name: feats[..., j] for j, name in enumerate(ITEM_VOCAB)}

    return {
        "seq": events(T, seq_len),
        "seq_len": seq_len,
        "long": events(L, long_len),
        "long_len": long_len,
        "user": {"user": torch.tensor([2, 3, 4, 5]), "age": torch.tensor([2, 3, 2, 1])},
    }


def make_model(variant: str, seed: int = 0, **kw) -> SDM:
    torch.manual_seed(seed)
    config = ModelConfig(variant=variant, item_vocab=ITEM_VOCAB, user_vocab=USER_VOCAB, embedding_dim=D, **kw)
    return SDM(config, item_table())


def prefix(batch: dict, n: int) -> dict:
    """The batch cut to its first n positions (what a per-prefix sample would see)."""
    out = dict(batch)
    out["seq"] = {k: v[:, :n] for k, v in batch["seq"].items()}
    out["seq_len"] = batch["seq_len"].clamp(max=n)
    return out


# -- parts ---------------------------------------------------------------------


def test_embedding_bank_shapes_and_padding() -> None:
    torch.manual_seed(0)
    bank = EmbeddingBank({"item": 10, "category": 4}, D)
    out = bank([torch.tensor([[0, 3]]), torch.tensor([[2, 0]])])
    assert [tuple(o.shape) for o in out] == [(1, 2, D), (1, 2, D)]
    assert out[0][0, 0].abs().sum() == 0 and out[1][0, 1].abs().sum() == 0  # padding rows are zero


def test_user_attention_shape_and_empty_rows() -> None:
    torch.manual_seed(0)
    attn = UserAttention(user_dim=12, dim=D)
    keys = torch.randn(3, 5, D)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool).unsqueeze(1)
    out = attn(torch.randn(3, 12), keys, mask)
    assert out.shape == (3, 1, D)
    assert torch.isfinite(out).all()
    assert out[1].abs().sum() == 0  # no allowed key -> zeros, not NaN
    # A masked key does not matter.
    keys2 = keys.clone()
    keys2[0, 2:] = 100.0
    user = torch.randn(3, 12)
    torch.testing.assert_close(attn(user, keys, mask)[0], attn(user, keys2, mask)[0])


@pytest.mark.parametrize("user_dim", [None, 16])
def test_short_term_encoder_shape(user_dim: int | None) -> None:
    torch.manual_seed(0)
    enc = ShortTermEncoder(D, lstm_layers=2, num_heads=2, dropout=0.0, user_dim=user_dim)
    out = enc(torch.randn(B, T, D), torch.randn(B, 16) if user_dim else None)
    assert out.shape == (B, T, D)


def test_long_term_encoder_shape_and_empty_history() -> None:
    torch.manual_seed(0)
    enc = LongTermEncoder(num_features=3, dim=D, user_dim=16)
    mask = torch.arange(L) < torch.tensor([5, 0, 2, 0]).unsqueeze(1)
    p = enc([torch.randn(B, L, D) for _ in range(3)], mask, torch.randn(B, 16))
    assert p.shape == (B, D)
    torch.testing.assert_close(p[1], torch.tanh(enc.dense.bias))  # empty history: z = 0
    # L = 0 (no row has history) is well defined too.
    p0 = enc([torch.randn(B, 0, D) for _ in range(3)], torch.zeros(B, 0, dtype=torch.bool), torch.randn(B, 16))
    assert p0.shape == (B, D) and torch.isfinite(p0).all()


def test_gated_fusion_shape_and_gate_limits() -> None:
    torch.manual_seed(0)
    fusion = GatedFusion(D, user_dim=16)
    s, p = torch.randn(B, T, D), torch.randn(B, D)
    out = fusion(torch.randn(B, 16), s, p)
    assert out.shape == (B, T, D)
    # Gate output lies between p and s elementwise.
    lo, hi = torch.minimum(s, p.unsqueeze(1)), torch.maximum(s, p.unsqueeze(1))
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()


# -- whole model ----------------------------------------------------------------


@pytest.mark.parametrize("extras", [{}, {"state_query": True}])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_every_variant(variant: str, extras: dict) -> None:
    model = make_model(variant, lstm_layers=2, **extras)
    batch = make_batch()
    out = model(batch)
    assert out.shape == (B, T, D)
    assert torch.isfinite(out).all()
    (out.square().mean() + model.all_item_vectors().square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{variant}: {name} unused"
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("extras", [{}, {"user_residual": True, "state_query": True, "repeat": True}])
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_pass_equals_each_prefix(variant: str, extras: dict) -> None:
    model = make_model(variant, lstm_layers=2, **extras).eval()
    batch = make_batch()
    with torch.no_grad():
        full = model(batch)
        for n in range(1, T + 1):
            alone = model(prefix(batch, n))
            valid = batch["seq_len"] >= n
            torch.testing.assert_close(alone[valid, n - 1], full[valid, n - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_invariance(variant: str) -> None:
    model = make_model(variant).eval()
    batch = make_batch()
    longer = dict(batch)
    longer["seq"] = {k: torch.nn.functional.pad(v, (0, 3)) for k, v in batch["seq"].items()}
    longer["long"] = {k: torch.nn.functional.pad(v, (0, 2)) for k, v in batch["long"].items()}
    with torch.no_grad():
        a, b = model(batch), model(longer)
    valid = torch.arange(T) < batch["seq_len"].unsqueeze(1)
    torch.testing.assert_close(b[:, :T][valid], a[valid], atol=1e-5, rtol=0)


def test_empty_long_term_batch() -> None:
    model = make_model("PSDMMAL").eval()
    batch = make_batch()
    batch["long"] = {k: v[:, :0] for k, v in batch["long"].items()}  # L = 0
    batch["long_len"] = torch.zeros(B, dtype=torch.long)
    assert torch.isfinite(model(batch)).all()


def test_nos_ignores_side_features() -> None:
    model = make_model("PSDMMAL-NoS").eval()
    assert model.item_emb.names == ["item"] and model.user_emb.names == ["user"]
    assert model.item_table.shape == (ITEM_VOCAB["item"], 1)
    batch = make_batch()
    other = make_batch()
    for part in ("seq", "long"):
        other[part] = {k: (v if k == "item" else torch.zeros_like(v)) for k, v in batch[part].items()}
    other["user"] = {"user": batch["user"]["user"], "age": torch.zeros(B, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(other))
    # The item-id-only table is enough for it.
    config = ModelConfig(variant="PSDMMAL-NoS", item_vocab=ITEM_VOCAB, user_vocab=USER_VOCAB, embedding_dim=D)
    assert SDM(config, None).item_table.shape == (ITEM_VOCAB["item"], 1)


def test_no_user_profile_uses_learned_vector() -> None:
    torch.manual_seed(0)
    config = ModelConfig(variant="PSDMMAL", item_vocab=ITEM_VOCAB, user_vocab={}, embedding_dim=D)
    model = SDM(config, item_table())
    batch = make_batch()
    batch["user"] = {}
    out = model(batch)
    out.sum().backward()
    assert out.shape == (B, T, D) and model.user_default.grad is not None


def test_item_tower_matches_session_input() -> None:
    """The item tower reads item_table; the session input reads the batch: same vectors for known items."""
    model = make_model("PSDMMAL").eval()
    batch = make_batch()
    items = batch["seq"]["item"]
    from_batch = model.item_input([batch["seq"][f] for f in model.item_features])
    torch.testing.assert_close(model.item_vectors(items), from_batch)
    assert model.all_item_vectors().shape == (ITEM_VOCAB["item"], D)
    torch.testing.assert_close(model.all_item_vectors()[items], from_batch)


def test_missing_feature_in_batch_is_named() -> None:
    model = make_model("PSDMMAL")
    batch = make_batch()
    del batch["seq"]["brand"]
    with pytest.raises(ValueError, match=r"batch\['seq'\] lacks features \['brand'\]"):
        model(batch)


def test_bf16_autocast_runs() -> None:
    model = make_model("PSDMMAL-N")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch())
    assert torch.isfinite(out.float()).all()


def test_state_dict_round_trip() -> None:
    model = make_model("PSDMMAL-N").eval()
    clone = SDM(ModelConfig.model_validate(model.config.model_dump()), item_table())
    clone.load_state_dict(model.state_dict())
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(batch), model(batch))


# -- constructor checks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_dim": 10, "num_heads": 4}, r"embedding_dim \(10\) must be divisible by num_heads \(4\)"),
        ({"variant": "SDM++"}, r"variant"),
        ({"item_vocab": {"category": 5}}, r"item_vocab must contain 'item'"),
        ({"item_vocab": {"category": 5, "item": 12}}, r"'item' must be the first key"),
        ({"item_vocab": {"item": 2}}, r"item_vocab\['item'\] must be >= 3"),
        ({"user_vocab": {"user": 1}}, r"user_vocab\['user'\] must be >= 2"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"lstm_layers": 0}, r"must be >= 1"),
        ({"colour": "red"}, r"colour"),
    ],
)
def test_config_checks(kwargs: dict, message: str) -> None:
    args = {"item_vocab": ITEM_VOCAB, "user_vocab": USER_VOCAB, **kwargs}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**args)


def test_item_table_checks() -> None:
    config = ModelConfig(item_vocab=ITEM_VOCAB, user_vocab=USER_VOCAB, embedding_dim=D)
    with pytest.raises(ValueError, match=r"item_table is None but variant PSDMMAL-N reads item side features \['category', 'brand'\]"):
        SDM(config, None)
    with pytest.raises(ValueError, match=r"item_table has shape \(12, 2\), expected"):
        SDM(config, item_table()[:, :2])
    with pytest.raises(ValueError, match=r"2-D integer tensor"):
        SDM(config, item_table().float())
    bad = item_table()
    bad[5, 1] = 5
    with pytest.raises(ValueError, match=r"column 'category' has indices in \[0, 5\], outside its vocabulary of size 5"):
        SDM(config, bad)
    shuffled = item_table()
    shuffled[[2, 3]] = shuffled[[3, 2]]
    with pytest.raises(ValueError, match=r"column 0 must be the item id"):
        SDM(config, shuffled)


def test_user_residual_adds_the_positions_own_state() -> None:
    """s_p = h_p + user attention: at position 0 (one key, attention weight 1) that is 2 h_0."""
    torch.manual_seed(0)
    enc = ShortTermEncoder(D, 1, 2, 0.0, user_dim=D).eval()
    res = ShortTermEncoder(D, 1, 2, 0.0, user_dim=D, residual=True).eval()
    res.load_state_dict(enc.state_dict())
    x, u = torch.randn(2, 4, D), torch.randn(2, D)
    with torch.no_grad():
        plain, with_res = enc(x, u), res(x, u)
    torch.testing.assert_close(with_res[:, 0], 2 * plain[:, 0])
    assert not torch.allclose(with_res[:, 1:], plain[:, 1:])


def test_state_query_attends_by_user_and_position_state() -> None:
    """With the state query, position p's weights are softmax_k((W e_u + W_h h_p) . h_k / sqrt(D)), k <= p:
    checked against a loop over positions; without it every position uses W e_u alone."""
    torch.manual_seed(0)
    enc = ShortTermEncoder(D, 1, 2, 0.0, user_dim=16, state_query=True).eval()
    x, u = torch.randn(2, T, D), torch.randn(2, 16)
    with torch.no_grad():
        out = enc(x, u)
        enc.state_query.weight.zero_()
        user_only = enc(x, u)
        enc.user_attn.query.weight.zero_()
        state_zeroed = enc(x, u)
    torch.manual_seed(0)
    ref = ShortTermEncoder(D, 1, 2, 0.0, user_dim=16, state_query=True).eval()
    with torch.no_grad():
        h = x
        for lstm in ref.lstms:
            h = h + lstm(h)[0]
        h = ref.norm(h + ref.attn(h))  # (2, T, D)
        for b in range(2):
            for p in range(T):
                q = ref.user_attn.query(u[b]) + ref.state_query(h[b, p])  # (D,)
                w = torch.softmax(h[b, : p + 1] @ q / D**0.5, dim=0)  # (p + 1,)
                torch.testing.assert_close(out[b, p], w @ h[b, : p + 1], atol=1e-5, rtol=0)
        plain = ShortTermEncoder(D, 1, 2, 0.0, user_dim=16)
        plain.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("state_query")})
        torch.testing.assert_close(user_only, plain.eval()(x, u), atol=1e-6, rtol=0)
    # Both queries zero: uniform weights over k <= p, the running mean of h.
    torch.testing.assert_close(state_zeroed, h.cumsum(1) / torch.arange(1, T + 1).view(1, T, 1), atol=1e-5, rtol=0)


def test_state_query_needs_user_attention() -> None:
    """SDMMA has no user attention, so it builds no state query (every parameter gets a gradient)."""
    assert ShortTermEncoder(D, 1, 2, 0.0, user_dim=None, state_query=True).state_query is None
