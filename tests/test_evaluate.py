"""End-to-end `sdm evaluate` on a hand-made shard directory.

Every metric is recomputed in plain Python from `topk.parquet` and compared
with `metrics.json`; the model's lists are compared with brute-force scoring;
each bad input gives its one-line SdmError.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from eval_shards import item_vocab, write_session_shards
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import EvaluateConfig
from sdm.errors import SdmError
from sdm.pipeline.dataset import SessionDataset
from sdm.pipeline.evaluate import evaluate
from sdm.pipeline.ranking import evaluate_model
from sdm.pipeline.scoring import session_queries

# 7 training items a..g (catalogue 7, num_items 9); x and y are OOV in test.
SESSIONS = {
    "train": [
        ("u1", [["a", "b", "c"], ["a", "b"], ["c", "d", "e"]]),
        ("u2", [["b", "c", "d"], ["e", "a"]]),
        ("u3", [["f", "g", "a", "b"]]),
    ],
    "valid": [("u1", [["a"]]), ("u2", [["b"]])],  # length 1 only: no queries
    "test": [
        ("u1", [["a", "b", "x", "a"], ["c", "d"]]),
        ("u2", [["b", "b", "c", "y", "e"]]),
        ("u4", [["g", "f", "a"]]),
        ("u5", [["c", "x", "z", "d"]]),  # two distinct OOV targets: |G| of the first query is 3, not 2
    ],
}
KS = [1, 3, 5]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_session_shards(tmp_path_factory.mktemp("eval") / "data", SESSIONS)


def _sdm_checkpoint(model_dir: Path, fingerprint: str = "fp-test", **kw: Any) -> torch.nn.Module:
    from sdm.model.sdm import SDM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(variant="PSDMMAL-N", item_vocab={"item": 9}, user_vocab={"user": 7}, embedding_dim=8, **kw)
    model = SDM(cfg).eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "model_config": cfg.model_dump(mode="json"), "data_fingerprint": fingerprint,
         "config": {}, "step": 0, "epoch": 0},
        model_dir / "best.pt",
    )  # fmt: skip
    return model


def recompute(topk_path: Path, ks: list[int]) -> dict[str, Any]:
    """Every SPEC-6 metric from the dump alone, in plain Python sets: the target set of a query is
    the distinct next items of its session from its position on, an OOV one named by its `target_oov`
    (distinct unknown items count apart, and never hit)."""
    rows = pq.read_table(topk_path).to_pylist()
    by_session: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_session[(r["user_id"], r["session_start"])].append(r)
    sums: dict[str, float] = defaultdict(float)
    for r in rows:
        goal = {
            o["target"] if o["target"] is not None else ("oov", o["target_oov"])
            for o in by_session[(r["user_id"], r["session_start"])]
            if o["position"] >= r["position"]
        }
        y = r["target"]
        for k in ks:
            p = r["topk"][:k]
            rank = p.index(y) + 1 if y is not None and y in p else None
            hits = len(set(p) & goal)
            prec, rec = hits / k, hits / len(goal)
            sums[f"hr@{k}"] += rank is not None
            sums[f"ndcg@{k}"] += 1 / math.log2(rank + 1) if rank else 0
            sums[f"mrr@{k}"] += 1 / rank if rank else 0
            sums[f"precision@{k}"] += prec
            sums[f"recall@{k}"] += rec
            sums[f"f1@{k}"] += 2 * prec * rec / (prec + rec) if prec + rec else 0
    out = {k: v / len(rows) for k, v in sums.items()}
    out["queries"] = len(rows)
    out["sessions"] = len(by_session)
    out["users"] = len({u for u, _ in by_session})
    out["oov_target_share"] = sum(r["target"] is None for r in rows) / len(rows)
    return out


def _check_against_dump(out: Path) -> dict[str, Any]:
    report = json.loads((out / "metrics.json").read_text())
    assert report["format"] == "sdm-metrics" and report["ks"] == KS
    metrics = {**report, **report["methods"][0]}
    expected = recompute(out / "topk.parquet" if metrics["kind"] == "model" else out / f"topk_{metrics['name']}.parquet", KS)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    return metrics


def test_session_queries_by_hand() -> None:
    items = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0], [8, 0, 0, 0]])
    q = session_queries(items, torch.tensor([3, 2, 1]))
    assert q.qb.tolist() == [0, 0, 1] and q.qp.tolist() == [0, 1, 0]
    assert q.target.tolist() == [4, 5, 7]
    assert q.targets.tolist() == [[0, 4, 5, 0], [0, 0, 5, 0], [0, 7, 0, 0]]
    assert q.prefix.tolist() == [[3, 0, 0, 0], [3, 4, 0, 0], [6, 0, 0, 0]]


@pytest.mark.parametrize("baseline", ["popularity", "itemcf", "itemcf-repeat"])
def test_baseline_metrics_match_the_dump(data: Path, tmp_path: Path, baseline: str) -> None:
    cfg = EvaluateConfig(data=data, out=tmp_path / "eval", k=KS, baseline=baseline, dump_topk=True)
    result = evaluate(cfg)
    metrics = _check_against_dump(cfg.out)
    # [a b x a] 3 + [c d] 1 + [b b c y e] 4 + [g f a] 2 + [c x z d] 3 queries; x, y, x, z are OOV targets.
    assert (metrics["queries"], metrics["sessions"], metrics["users"]) == (13, 5, 4)
    assert metrics["oov_target_share"] == pytest.approx(4 / 13)
    assert metrics["name"] == baseline and metrics["split"] == "test" and metrics["fingerprint"] == "fp-test"
    assert "| K |" in result["table"] and result["table"] == (cfg.out / "report.md").read_text().strip()
    assert (cfg.out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((cfg.out / "config.json").read_text())["baseline"] == [baseline]
    dump = pq.read_table(cfg.out / f"topk_{baseline}.parquet")
    assert str(dump.schema.field("session_start").type) == "timestamp[us, tz=UTC]"
    assert min(dump.column("position").to_pylist()) == 2
    assert all(len(t) == 5 and None not in t for t in dump.column("topk").to_pylist())


def test_exclude_seen_never_recommends_the_prefix(data: Path, tmp_path: Path) -> None:
    cfg = EvaluateConfig(data=data, out=tmp_path / "eval", k=KS, baseline="itemcf-repeat", dump_topk=True,
                         exclude_seen=True)  # fmt: skip
    evaluate(cfg)
    _check_against_dump(cfg.out)
    rows = pq.read_table(cfg.out / "topk_itemcf-repeat.parquet").to_pylist()
    starts = defaultdict(set)
    for r in rows:
        starts[r["user_id"]].add(r["session_start"])
    for r in rows:
        order = sorted(starts[r["user_id"]]).index(r["session_start"])
        items = [s for u, ss in SESSIONS["test"] if u == r["user_id"] for s in ss if len(s) >= 2][order]
        assert not set(items[: r["position"] - 1]) & set(r["topk"]), (r, items)
    assert len(rows) == 13


def test_repeat_aware_beats_classic_on_revisits(data: Path, tmp_path: Path) -> None:
    classic = evaluate(EvaluateConfig(data=data, out=tmp_path / "c", k=KS, baseline="itemcf"))
    repeat = evaluate(EvaluateConfig(data=data, out=tmp_path / "r", k=KS, baseline="itemcf-repeat"))
    # Re-visits: b after b, a after [a b x]: the repeat-aware form gets them within K = 1..3.
    assert repeat["hr@3"] >= classic["hr@3"]


def test_model_topk_equals_brute_force(data: Path, tmp_path: Path) -> None:
    model = _sdm_checkpoint(tmp_path / "model")
    cfg = EvaluateConfig(data=data, model=tmp_path / "model", out=tmp_path / "eval", k=KS, dump_topk=True,
                         device="cpu")  # fmt: skip
    metrics = evaluate(cfg)
    assert metrics["name"] == "PSDMMAL-N"
    _check_against_dump(cfg.out)
    expected = []
    with torch.no_grad():
        items = model.all_item_vectors()
        for batch in SessionDataset(data, "test", 2, shuffle=False):
            q = session_queries(batch["seq"]["item"], batch["seq_len"])
            scores = model(batch)[q.qb, q.qp] @ items.T
            scores[:, :2] = float("-inf")
            expected += scores.topk(5, dim=1).indices.tolist()
    raw = {2 + n: r for n, r in enumerate("abcdefg")}  # train counts a 4, b 4, c 3, d 2, e 2, f 1, g 1
    assert {i: r for r, i in item_vocab(SESSIONS).items()} == raw
    assert [[raw[i] for i in row] for row in expected] == pq.read_table(cfg.out / "topk.parquet")["topk"].to_pylist()


@pytest.mark.parametrize("repeat", [False, True])
def test_model_with_faiss_reports_recall_against_exact(data: Path, tmp_path: Path, repeat: bool) -> None:
    """With the repeat head the index's top-K is merged with the history candidates as serving does,
    so a 7-item index still equals exact scoring (which adds the copy scores chunk by chunk)."""
    pytest.importorskip("faiss")
    model = _sdm_checkpoint(tmp_path / "model", repeat=repeat)
    if repeat:  # make the copy scores matter: a strong gate
        with torch.no_grad():
            model.repeat.gate.bias.fill_(5.0)
        ckpt = torch.load(tmp_path / "model" / "best.pt", weights_only=True)
        ckpt["model"] = model.state_dict()
        torch.save(ckpt, tmp_path / "model" / "best.pt")
    cfg = EvaluateConfig(data=data, model=tmp_path / "model", out=tmp_path / "eval", k=KS, index="faiss")
    metrics = evaluate(cfg)
    assert metrics["faiss_recall@5"] == pytest.approx(1.0)  # 7 items: HNSW is exact
    assert "faiss recall" in metrics["table"]


def test_evaluate_model_restores_training_mode_and_tolerates_large_k(data: Path, tmp_path: Path) -> None:
    model = _sdm_checkpoint(tmp_path / "model").train()
    m = evaluate_model(model, data, "test", [50], 512, "cpu")  # the trainer's call
    assert model.training and m["queries"] == 13 and 0 <= m["hr@50"] <= 1
    assert evaluate_model(model, data, "valid", [5], 512, "cpu")["queries"] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "missing"}, r"missing: model directory not found"),
        ({"model": "empty"}, r"no best.pt; the training run that wrote it did not finish"),
        ({"model": "foreign"}, r"model trained on another dataset"),
        ({"k": [8]}, r"--k 8 is larger than the catalogue .* \(7 items\)"),
        ({"split": "valid"}, r"split 'valid' has no queries: no sessions of length >= 2 after the validation cutoff"),
    ],
)
def test_bad_input_is_one_line_sdm_error(data: Path, tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "empty").mkdir()
    _sdm_checkpoint(tmp_path / "foreign", fingerprint="another")
    _sdm_checkpoint(tmp_path / "good")
    kw: dict[str, Any] = {"data": data, "model": tmp_path / "good", "out": tmp_path / "eval", "k": KS}
    kw.update({k: tmp_path / v if k == "model" else v for k, v in change.items()})
    with pytest.raises(SdmError, match=message) as exc:
        evaluate(EvaluateConfig(**kw))
    assert "\n" not in str(exc.value)


def test_faiss_not_installed(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sdm_checkpoint(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "faiss", None)
    cfg = EvaluateConfig(data=data, model=tmp_path / "model", out=tmp_path / "eval", k=KS, index="faiss")
    with pytest.raises(SdmError, match=r"pip install 'sdm\[faiss\]'"):
        evaluate(cfg)


def test_cli_good_and_bad(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "eval"
    ok = runner.invoke(app, ["evaluate", "--data", str(data), "--baseline", "popularity", "--k", "1,3",
                             "--out", str(out), "--quiet"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "**popularity** on test: 13 queries" in ok.output and (out / "metrics.json").is_file()
    bad = runner.invoke(app, ["evaluate", "--data", str(data), "--model", str(tmp_path / "nope"), "--k", "3", "--quiet"])
    assert bad.exit_code == 1
    assert "model directory not found" in bad.output


def test_default_k_is_capped_at_the_catalogue_with_a_note(data: Path, tmp_path: Path, capsys) -> None:
    metrics = evaluate(EvaluateConfig(data=data, out=tmp_path / "eval", baseline="popularity"))  # K 20,50,100; 7 items
    assert "K capped to 7" in capsys.readouterr().err
    assert "hr@7" in metrics and "hr@20" not in metrics


def test_out_rules_same_as_every_command(data: Path, tmp_path: Path) -> None:
    cfg = EvaluateConfig(data=data, out=tmp_path / "eval", k=KS, baseline="popularity")
    evaluate(cfg)
    with pytest.raises(SdmError, match="earlier `sdm evaluate` output .*; pass --overwrite"):
        evaluate(cfg)
    evaluate(cfg.model_copy(update={"overwrite": True}))  # its own reports are replaced
    keep = cfg.out / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(SdmError, match="holds 'notes.txt', which `sdm evaluate` did not write"):
        evaluate(cfg.model_copy(update={"overwrite": True}))
    assert keep.read_text() == "mine" and (cfg.out / "metrics.json").exists()  # refused before anything was deleted
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--out", str(tmp_path / "file"), "--baseline", "popularity"])
    assert r.exit_code == 1 and "exists and is not a directory" in r.output


@pytest.mark.parametrize("damage", ["empty", "tensor", "pickle", "shapes", "config"])
def test_bad_checkpoint_is_one_line(data: Path, tmp_path: Path, damage: str) -> None:
    import pickle

    model_dir = tmp_path / "model"
    _sdm_checkpoint(model_dir)
    path = model_dir / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "tensor":
        torch.save(torch.zeros(2), path)
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"model": object()}))
    elif damage == "shapes":
        ckpt["model"] = {k: v[..., :1] if v.dim() else v for k, v in ckpt["model"].items()}
        torch.save(ckpt, path)
    else:
        ckpt["model_config"]["embedding_dim"] = -3
        torch.save(ckpt, path)
    r = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--model", str(model_dir), "--out", str(tmp_path / "e"),
                                 "--k", "1,3", "-q"])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and str(path) in r.output and "Traceback" not in r.output, r.output


def test_model_and_baselines_in_one_run(data: Path, tmp_path: Path) -> None:
    _sdm_checkpoint(tmp_path / "model")
    cfg = EvaluateConfig(data=data, model=tmp_path / "model", out=tmp_path / "eval", k=KS,
                         baseline="popularity,itemcf-repeat", dump_topk=True)  # fmt: skip
    result = evaluate(cfg)
    report = json.loads((cfg.out / "metrics.json").read_text())
    assert [m["name"] for m in report["methods"]] == ["PSDMMAL-N", "popularity", "itemcf-repeat"]
    assert [m["kind"] for m in report["methods"]] == ["model", "baseline", "baseline"]
    assert report["methods"][0]["checkpoint_step"] == 0 and report["catalogue"] == 7
    assert report["fingerprint"] == "fp-test" and report["curve_ks"] == list(range(1, 8))
    assert all(len(m["curve"]["ndcg"]) == 7 for m in report["methods"])
    for m in report["methods"]:  # each method's metrics from its own dump, recomputed in plain Python
        dump = cfg.out / ("topk.parquet" if m["kind"] == "model" else f"topk_{m['name']}.parquet")
        for key, value in recompute(dump, KS).items():
            assert {**report, **m}[key] == pytest.approx(value, abs=1e-6), (m["name"], key)
        # the curve at K is the metric at K
        assert m["curve"]["hr"][4] == pytest.approx(m["hr@5"])
    assert result["table"].count("| popularity |") == len(KS)
    assert (cfg.out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_baselines_alone_when_there_is_no_model(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the default runs/model does not exist here
    evaluate(EvaluateConfig(data=data, out=tmp_path / "eval", k=KS, baseline="popularity"))
    assert "evaluating the baselines only" in capsys.readouterr().err
    with pytest.raises(SdmError, match="--index faiss needs a model"):
        evaluate(EvaluateConfig(data=data, out=tmp_path / "e2", k=KS, baseline="popularity", index="faiss"))
    with pytest.raises(SdmError, match="model directory not found"):  # an explicit --model must exist
        evaluate(EvaluateConfig(data=data, model=tmp_path / "nope", out=tmp_path / "e3", k=KS, baseline="popularity"))
