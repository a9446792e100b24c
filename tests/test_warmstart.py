"""`sdm train --init-from`: yesterday's weights, tables grown for the new items, refusals, resume, CLI, DDP.

Data A has 20 items, data B 30 (the same users and features, ids 2..21 the same items);
B's manifest says it was sessionized with `--vocab-from A`, as `sdm sessionize
--vocab-from` records it. M1 is a model trained on A.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from shard_builder import build_shards, file_table
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import TrainConfig
from sdm.errors import ConfigError, DataError, OutputError, SdmError
from sdm.pipeline.train import build_run, train
from sdm.pipeline.trainstep import train_step
from sdm.pipeline.warmstart import is_data_buffer

ITEM_ID = "item_emb.tables.0.weight"


def cfg(data, out, **kw):
    base = dict(data=data, out=out, batch_size=8, embedding_dim=16, num_negatives=8, epochs=1, log_every=1)
    base.update(kw)
    if base.get("loss") == "full":  # no negatives to draw: the flag would be refused
        del base["num_negatives"]
    return TrainConfig(**base)


def reseal(root: Path, **changes) -> Path:
    """Edit the manifest as sessionize would have written it (its files table recomputed)."""
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    m["files"] = file_table(root)
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def shards(root: Path, fingerprint: str, n_items: int, n_users: int = 16, extends: Path | None = None) -> Path:
    build_shards(root, n_users=n_users, sessions_per_user=4, session_len=5, n_items=n_items, n_shards=4)
    vocab_from = None
    if extends is not None:
        prev = json.loads((extends / "manifest.json").read_text())
        vocab_from = {"path": str(extends), "fingerprint": prev["fingerprint"], "vocab_sizes": prev["vocab_sizes"]}
    return reseal(root, fingerprint=fingerprint, vocab_from=vocab_from)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A (20 items), B (30 items, 4 more users, --vocab-from A), and M1 trained on A."""
    root = tmp_path_factory.mktemp("warm")
    a = shards(root / "A", "fp-A", n_items=20)
    b = shards(root / "B", "fp-B", n_items=30, n_users=20, extends=a)
    m1 = root / "M1"
    train(cfg(a, m1), progress=False)
    return {"root": root, "A": a, "B": b, "M1": m1}


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_warm_start_copies_every_weight_and_zeroes_new_item_rows(world, tmp_path):
    old = weights(world["M1"] / "best.pt")
    run = build_run(cfg(world["B"], tmp_path / "m2", init_from=world["M1"]), 0, 1, 0.0)
    new = run.model.state_dict()
    assert old[ITEM_ID].shape[0] == 22 and new[ITEM_ID].shape[0] == 32
    torch.testing.assert_close(new[ITEM_ID][:22], old[ITEM_ID], rtol=0, atol=0)
    assert not new[ITEM_ID][22:].any()  # new items: a zero id row
    assert new.keys() == old.keys()
    for k in new:
        if k not in (ITEM_ID, "item_table") and not k.startswith("neighbours."):
            torch.testing.assert_close(new[k], old[k], rtol=0, atol=0, msg=k)
    # the neighbour table is data: rebuilt from B's training split after training, never carried
    assert new["neighbours.items"].numel() == 0 and float(new["neighbours.weight"]) == 0
    # the item table is B's; a new item's vector is the projection of (zero id, its category)
    assert run.model.item_table.shape == (32, 2) and int(run.model.item_table[25, 1]) == 2 + 25 % 3
    cat = run.model.item_emb.tables[1].weight[2 + 25 % 3]
    with torch.no_grad():
        expect = run.model.item_proj(torch.cat([torch.zeros(16), cat]))
        torch.testing.assert_close(run.model.item_vectors(torch.tensor([25]))[0], expect)
    # the weight average starts from the warm weights
    for k, v in run.ema.avg.items():
        torch.testing.assert_close(v, new[k], rtol=0, atol=0, msg=k)
    carried = sum(not is_data_buffer(k) for k in new)
    w = run.warm
    assert (w.carried, w.total, w.items_before, w.items_after, w.step) == (carried, carried, 22, 32, old_step(world))
    assert run.init_from == {"path": str(world["M1"]), "step": old_step(world), "data_fingerprint": "fp-A",
                             "items_before": 22}  # fmt: skip


def test_warm_start_carries_the_optimizer_moments_grown_like_the_weights(world, tmp_path):
    """AdamW's moments of M1's best.pt continue: old rows as they were, a new row with no first
    moment and the old rows' mean second moment; the learning rate and weight decay are this run's."""
    saved = torch.load(world["M1"] / "best.pt", weights_only=True)["optimizer"]
    run = build_run(cfg(world["B"], tmp_path / "m2", init_from=world["M1"], lr=0.0123, weight_decay=0.0), 0, 1, 0.0)
    names = [n for n, _ in run.model.named_parameters()]
    params = dict(run.model.named_parameters())
    assert len(run.opt.state) == len(saved["state"]) == len(names)
    for i, name in enumerate(names):
        old, new = saved["state"][i], run.opt.state[params[name]]
        assert float(new["step"]) == float(old["step"]) > 0
        if name != ITEM_ID:
            torch.testing.assert_close(new["exp_avg"], old["exp_avg"], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(new["exp_avg_sq"], old["exp_avg_sq"], rtol=0, atol=0, msg=name)
            continue
        assert new["exp_avg"].shape == (32, 16)
        torch.testing.assert_close(new["exp_avg"][:22], old["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(new["exp_avg_sq"][:22], old["exp_avg_sq"], rtol=0, atol=0)
        assert not new["exp_avg"][22:].any()
        torch.testing.assert_close(new["exp_avg_sq"][22:], old["exp_avg_sq"].mean(0).expand(10, 16), rtol=0, atol=0)
    assert run.opt.param_groups[0]["lr"] == 0.0123 and run.opt.param_groups[0]["weight_decay"] == 0.0
    fresh = build_run(cfg(world["B"], tmp_path / "m3", init_from=world["M1"], init_moments=False), 0, 1, 0.0)
    assert not fresh.opt.state
    train(cfg(world["B"], tmp_path / "m4", init_from=world["M1"], max_steps=2), progress=False)  # the moments train


def test_init_moments_without_init_from_is_an_error(world, tmp_path):
    with pytest.raises(ConfigError, match="act only with --init-from"):
        build_run(cfg(world["A"], tmp_path / "m", init_moments=False), 0, 1, 0.0)


def test_a_checkpoint_whose_moments_do_not_match_its_weights_is_one_line(world, tmp_path):
    ckpt = torch.load(world["M1"] / "best.pt", weights_only=True)
    ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 5)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(ckpt, bad / "best.pt")
    with pytest.raises(DataError, match="optimizer state of the --init-from checkpoint does not match weight"):
        build_run(cfg(world["B"], tmp_path / "m", init_from=bad), 0, 1, 0.0)
    ckpt["optimizer"]["state"] = {"0": {"step": torch.tensor(1.0)}}  # a key that is no parameter index
    torch.save(ckpt, bad / "best.pt")
    with pytest.raises(DataError, match=r"does not match its model \(entry '0'\)"):
        build_run(cfg(world["B"], tmp_path / "m", init_from=bad), 0, 1, 0.0)
    del ckpt["optimizer"]  # no optimizer state at all: a fresh optimizer
    torch.save(ckpt, bad / "best.pt")
    run = build_run(cfg(world["B"], tmp_path / "m", init_from=bad), 0, 1, 0.0)
    assert not run.opt.state and run.warm.line().endswith(", a fresh optimizer")


def old_step(world):
    return torch.load(world["M1"] / "best.pt", weights_only=True)["step"]


def test_grown_user_table_keeps_old_rows_and_fresh_init_for_new_users(world, tmp_path):
    """With the user id as a feature its table grows 18 -> 22: old rows copied, new rows the fresh init."""
    m1u = tmp_path / "m1u"
    train(cfg(world["A"], m1u, user_features="user,age", max_steps=2), progress=False)
    old = weights(m1u / "best.pt")
    kw = dict(user_features="user,age")
    warm = build_run(cfg(world["B"], tmp_path / "w", init_from=m1u, **kw), 0, 1, 0.0).model.state_dict()
    fresh = build_run(cfg(world["B"], tmp_path / "f", **kw), 0, 1, 0.0).model.state_dict()
    users = "user_emb.tables.0.weight"
    assert old[users].shape[0] == 18 and warm[users].shape[0] == 22
    torch.testing.assert_close(warm[users][:18], old[users], rtol=0, atol=0)
    torch.testing.assert_close(warm[users][18:], fresh[users][18:], rtol=0, atol=0)
    assert warm[users][18:].abs().sum() > 0


def test_retraining_on_the_same_data_needs_no_vocab_from(world, tmp_path):
    run = build_run(cfg(world["A"], tmp_path / "again", init_from=world["M1"]), 0, 1, 0.0)
    old = weights(world["M1"] / "best.pt")
    for k, v in run.model.state_dict().items():
        if not k.startswith("neighbours."):  # the neighbour table is rebuilt after training
            torch.testing.assert_close(v, old[k], rtol=0, atol=0, msg=k)
    assert "item table unchanged (22 rows)" in run.warm.line()


def test_refuses_a_model_of_unrelated_data(world, tmp_path):
    other = shards(tmp_path / "C", "fp-C", n_items=30)  # no vocab_from
    with pytest.raises(DataError, match=r"does not extend \(its manifest has no vocab_from\); sessionize the new log "
                                        r"with --vocab-from .*A so every id keeps its index"):  # fmt: skip
        build_run(cfg(other, tmp_path / "m", init_from=world["M1"]), 0, 1, 0.0)
    reseal(other, vocab_from={"path": "x", "fingerprint": "fp-X", "vocab_sizes": {}})
    with pytest.raises(DataError, match=r"trained on data fp-A, which .* does not extend \(its manifest has vocab_from fp-X\)"):
        build_run(cfg(other, tmp_path / "m", init_from=world["M1"]), 0, 1, 0.0)


def test_refuses_a_shrunk_vocabulary(world, tmp_path):
    small = shards(tmp_path / "S", "fp-S", n_items=15, extends=world["A"])
    with pytest.raises(DataError, match=r"vocabulary 'item' shrinks 22 -> 17 in .*S; the new data must extend"):
        build_run(cfg(small, tmp_path / "m", init_from=world["M1"]), 0, 1, 0.0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"embedding_dim": 32}, "embedding_dim 16 -> 32"),
        ({"variant": "PSDMMA"}, "variant PSDMMAL-N -> PSDMMA"),
        ({"repeat": False}, "repeat True -> False"),
        ({"item_features": []}, "item features ['item', 'category'] -> ['item']"),
        ({"user_features": "user,age"}, "user features ['age'] -> ['user', 'age']"),
    ],
)
def test_refuses_another_model_config_naming_the_field(world, tmp_path, change, named):
    with pytest.raises(ConfigError, match="the model has another config than this run") as err:
        build_run(cfg(world["B"], tmp_path / "m", init_from=world["M1"], **change), 0, 1, 0.0)
    assert f"({named}); a warm start changes only the vocabulary sizes" in str(err.value)


def test_refuses_out_as_the_previous_model_and_a_directory_without_best_pt(world, tmp_path):
    with pytest.raises(OutputError, match=r"is the --init-from model"):
        train(cfg(world["B"], world["M1"], init_from=world["M1"], overwrite=True), progress=False)
    assert (world["M1"] / "best.pt").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdmError, match=r"best.pt: checkpoint not found"):
        train(cfg(world["B"], tmp_path / "m", init_from=tmp_path / "empty"), progress=False)
    with pytest.raises(DataError, match=r"not a model directory"):
        train(cfg(world["B"], tmp_path / "m", init_from=tmp_path / "missing"), progress=False)


def test_cli_refusal_is_one_line(world, tmp_path):
    r = CliRunner().invoke(app, ["train", "--data", str(world["B"]), "--out", str(tmp_path / "m"), "--init-from",
                                 str(world["M1"]), "--embedding-dim", "32", "-q"])  # fmt: skip
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "embedding_dim 16 -> 32" in r.output


def test_cli_init_moments_without_init_from_is_one_line(world, tmp_path):
    r = CliRunner().invoke(app, ["train", "--data", str(world["A"]), "--out", str(tmp_path / "m"), "--no-init-moments", "-q"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "--init-moments / --no-init-moments act only with --init-from" in r.output
    assert not (tmp_path / "m").exists()


def test_resume_continues_last_pt_and_ignores_init_from(world, tmp_path, capsys):
    full, half = tmp_path / "full", tmp_path / "half"
    kw = dict(init_from=world["M1"], epochs=5)
    train(cfg(world["B"], full, max_steps=6, **kw), progress=False)
    train(cfg(world["B"], half, max_steps=3, **kw), progress=False)
    capsys.readouterr()
    train(cfg(world["B"], half, max_steps=6, resume=True, **kw), progress=False)
    assert f"note: --resume continues {half / 'last.pt'}; --init-from {world['M1']} is ignored" in capsys.readouterr().err
    a, b = weights(full / "last.pt"), weights(half / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    record = {"path": str(world["M1"]), "step": old_step(world), "data_fingerprint": "fp-A", "items_before": 22}
    assert torch.load(half / "last.pt", weights_only=True)["init_from"] == record


@pytest.mark.parametrize(("loss", "quiet"), [("full", False), ("sampled", True), ("inbatch", False)])
def test_cli_warm_start_end_to_end(world, tmp_path, loss, quiet):
    out = tmp_path / "M2"
    args = ["train", "--data", str(world["B"]), "--out", str(out), "--init-from", str(world["M1"]), "--loss", loss,
            "--epochs", "1", "--batch-size", "8", "--embedding-dim", "16",
            *([] if loss == "full" else ["--num-negatives", "8"])]  # fmt: skip
    r = CliRunner().invoke(app, args + (["-q"] if quiet else []))
    assert r.exit_code == 0, r.output
    n = sum(not is_data_buffer(k) for k in weights(world["M1"] / "best.pt"))
    line = (f"[train] warm start from {world['M1'] / 'best.pt'}: {n} of {n} weights carried over, "
            "item table grown 22 -> 32 (10 new items start from their side features), optimizer moments carried over")  # fmt: skip
    assert (line in r.stderr) != quiet, r.stderr
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["init_from"] == {"path": str(world["M1"]), "step": old_step(world), "data_fingerprint": "fp-A",
                                  "items_before": 22}  # fmt: skip
    assert best["model"][ITEM_ID].shape[0] == 32 and best["data_fingerprint"] == "fp-B"
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


DDP_SCRIPT = """
import sys, torch
from sdm.config import TrainConfig
from sdm.pipeline.stepplan import setup_distributed
from sdm.pipeline.train import build_run, train
data, out, init, dump = sys.argv[1:]
cfg = TrainConfig(data=data, out=out, init_from=init, batch_size=4, embedding_dim=16, num_negatives=8, epochs=1,
                  device="cpu")
rank, world = setup_distributed("cpu")
run = build_run(cfg, rank, world, 0.0)
torch.save(run.model.state_dict(), f"{dump}/rank{rank}.pt")
del run
train(cfg, progress=False)
"""


def _torchrun(script_text: str, world, tmp_path: Path) -> Path:
    """Run `script_text` (args: data B, out, M1, dump folder) on two CPU processes; returns out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "ddp.py"
    script.write_text(script_text)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(world["B"]), str(out), str(world["M1"]), str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if r.returncode != 0 and "terminate called without an active exception" in r.stderr:
        pytest.skip("gloo abort on the loaded machine (see test_train.GLOO_ABORT)")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_torchrun_two_processes_load_the_same_warm_weights(world, tmp_path):
    out = _torchrun(DDP_SCRIPT, world, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    old = weights(world["M1"] / "best.pt")
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(r0[ITEM_ID][:22], old[ITEM_ID], rtol=0, atol=0)
    assert not r0[ITEM_ID][22:].any()
    assert torch.load(out / "best.pt", weights_only=True)["init_from"]["data_fingerprint"] == "fp-A"


# --- --distill-weight: keep the previous model's scores -----------------------------------------


def _batch(run):
    from sdm.pipeline.dataset import move_batch

    run.dataset.set_epoch(0)
    return move_batch(next(iter(run.loader)), run.device)


def _kl_by_hand(new_logits, prev_logits):
    """sum_j p_j log(p_j / q_j) per row, averaged: KL(prev || new) from probabilities."""
    p, q = torch.softmax(prev_logits.double(), 1), torch.softmax(new_logits.double(), 1)
    return float((p * (p.log() - q.log())).sum(1).mean())


def test_distill_teacher_is_the_warm_start_before_any_step(world, tmp_path):
    """The previous model is rebuilt bit for bit as the run's warm-started weights, frozen, in eval mode,
    and building it leaves the run's random state as it was."""
    from sdm.pipeline.distill import build_teacher

    run = build_run(cfg(world["B"], tmp_path / "m", init_from=world["M1"], distill_weight=1.0), 0, 1, 0.0)
    rng = torch.get_rng_state()
    teacher = build_teacher(run.cfg, run.model_cfg, run.manifest, run.init_from, run.device)
    assert torch.equal(rng, torch.get_rng_state())
    mine, theirs = run.model.state_dict(), teacher.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], rtol=0, atol=0, msg=k)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    off = build_run(cfg(world["B"], tmp_path / "m0", init_from=world["M1"]), 0, 1, 0.0)
    assert build_teacher(off.cfg, off.model_cfg, off.manifest, off.init_from, off.device) is None


def test_a_warm_start_may_turn_dropout_off(world, tmp_path):
    """A warm start may fine-tune with --dropout 0 a model trained with the default 0.2: the
    weights carry over, training is then free of dropout noise, and the new setting is saved."""
    assert torch.load(world["M1"] / "best.pt", weights_only=True)["model_config"]["dropout"] == 0.2
    noisy = build_run(cfg(world["B"], tmp_path / "noisy", init_from=world["M1"]), 0, 1, 0.0)
    quiet = build_run(cfg(world["B"], tmp_path / "quiet", init_from=world["M1"], dropout=0.0), 0, 1, 0.0)
    carried = quiet.model.state_dict()
    for k, v in noisy.model.state_dict().items():
        torch.testing.assert_close(carried[k], v, rtol=0, atol=0, msg=k)
    batch = _batch(quiet)
    for run, same in ((noisy, False), (quiet, True)):
        run.model.train()
        with torch.no_grad():
            assert torch.equal(run.model(batch), run.model(batch)) is same
    out = tmp_path / "m2"
    train(cfg(world["B"], out, init_from=world["M1"], dropout=0.0, distill_weight=1.0), progress=False)
    assert torch.load(out / "best.pt", weights_only=True)["model_config"]["dropout"] == 0.0


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_distill_loss_against_a_computation_by_hand(world, tmp_path, loss):
    """0 while the model equals the previous one; after a change, the KL of the softmaxes over the
    candidates (every item but padding and OOV, or the sampled ones with log-Q) at the positions
    with a next item, computed here from probabilities; the gradient reaches the model only."""
    from sdm.model.loss import target_pairs
    from sdm.pipeline.distill import build_teacher, distill_loss

    run = build_run(cfg(world["B"], tmp_path / "m", init_from=world["M1"], distill_weight=1.0, loss=loss), 0, 1, 0.0)
    teacher = build_teacher(run.cfg, run.model_cfg, run.manifest, run.init_from, run.device)
    model = run.model.eval()
    batch = _batch(run)
    with torch.no_grad():
        assert float(distill_loss(model, teacher, batch, model(batch), loss, run.sampler, None)) == pytest.approx(0, abs=1e-6)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(7)
    user_vecs = model(batch)
    got = distill_loss(model, teacher, batch, user_vecs, loss, run.sampler, gen)
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    rows, cols, _, _ = target_pairs(batch, 1)
    pos = sorted({(int(r), int(c)) for r, c in zip(rows, cols)})
    with torch.no_grad():
        new_u = torch.stack([user_vecs[r, c] for r, c in pos])
        prev_vecs = teacher(batch)
        prev_u = torch.stack([prev_vecs[r, c] for r, c in pos])
        if loss == "full":
            new_logits = new_u @ model.all_item_vectors()[2:].T
            prev_logits = prev_u @ teacher.all_item_vectors()[2:].T
        else:
            items = run.sampler.sample(torch.Generator().manual_seed(7))
            log_q = run.sampler.log_q[items]
            new_logits = new_u @ model.item_vectors(items).T - log_q
            prev_logits = prev_u @ teacher.item_vectors(items).T - log_q
    assert got.item() > 0
    assert got.item() == pytest.approx(_kl_by_hand(new_logits, prev_logits), rel=1e-4)


def test_distill_computes_the_previous_item_vectors_once(world, tmp_path):
    """With the full softmax the frozen previous model's item tower runs on the first step only:
    later steps reuse its vectors, and the loss is the same."""
    from sdm.pipeline.distill import build_teacher, distill_loss

    run = build_run(cfg(world["B"], tmp_path / "m", init_from=world["M1"], distill_weight=1.0, loss="full"), 0, 1, 0.0)
    teacher = build_teacher(run.cfg, run.model_cfg, run.manifest, run.init_from, run.device)
    calls, tower = [], teacher.all_item_vectors
    teacher.all_item_vectors = lambda: calls.append(1) or tower()
    model, batch = run.model.eval(), _batch(run)
    with torch.no_grad():
        losses = [float(distill_loss(model, teacher, batch, model(batch), "full", run.sampler, None)) for _ in range(3)]
    assert len(calls) == 1
    assert losses[0] == losses[1] == losses[2]
    assert "_frozen_items" not in teacher.state_dict()


def test_a_full_softmax_step_with_distill_runs_the_item_tower_once(world, tmp_path):
    """The loss and the term score the same item vectors: one pass of the model's item tower a
    step, and the step's loss is the one the two terms give with the tower run apart."""
    from sdm.model.loss import sdm_loss
    from sdm.pipeline.distill import build_teacher, distill_loss

    run = build_run(cfg(world["B"], tmp_path / "m", init_from=world["M1"], distill_weight=1.0, loss="full",
                        dropout=0.0), 0, 1, 0.0)  # fmt: skip
    teacher = build_teacher(run.cfg, run.model_cfg, run.manifest, run.init_from, run.device)
    model, batch = run.model.train(), _batch(run)
    with torch.no_grad():
        user_vecs, history = model(batch, with_history=True)
        apart = sdm_loss(model, batch, user_vecs, loss="full", target_decay=run.cfg.target_decay, history=history)
        apart = apart + distill_loss(model, teacher, batch, user_vecs, "full", run.sampler, None)
    calls, tower = [], model.all_item_vectors
    model.all_item_vectors = lambda: calls.append(1) or tower()
    loss, _ = train_step(model, model, run.opt, batch, run.sampler, run.gen, run.cfg, 0.0, nullcontext(), "full",
                         teacher)  # fmt: skip
    assert len(calls) == 1
    assert float(loss) == pytest.approx(float(apart), rel=1e-5)


def test_distill_keeps_the_previous_scores(world, tmp_path):
    """Trained with a large weight, the model's scores stay closer to the previous model's than without."""
    from sdm.pipeline.distill import build_teacher, distill_loss

    kl = {}
    for w in (0.0, 100.0):
        out = tmp_path / f"w{w:g}"
        train(cfg(world["B"], out, init_from=world["M1"], distill_weight=w, lr=0.05, epochs=3, ema_decay=0.0,
                  loss="full"), progress=False)  # fmt: skip
        run = build_run(cfg(world["B"], tmp_path / "probe", init_from=world["M1"], distill_weight=1.0, loss="full"),
                        0, 1, 0.0)  # fmt: skip
        teacher = build_teacher(run.cfg, run.model_cfg, run.manifest, run.init_from, run.device)
        run.model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
        run.model.eval()
        batch = _batch(run)
        with torch.no_grad():
            kl[w] = float(distill_loss(run.model, teacher, batch, run.model(batch), "full", run.sampler, None))
    assert 0 < kl[100.0] < 0.5 * kl[0.0], kl


@pytest.mark.parametrize("flag", ["--distill-weight", "--new-item-lr-scale"])
def test_a_warm_start_flag_without_init_from_is_one_line(world, tmp_path, flag):
    field = flag[2:].replace("-", "_")
    with pytest.raises(ConfigError, match=f"{flag} acts only with --init-from"):
        build_run(cfg(world["A"], tmp_path / "m", **{field: 10.0}), 0, 1, 0.0)
    args = ["train", "--data", str(world["A"]), "--out", str(tmp_path / "m"), flag, "10"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"{flag} acts only with --init-from" in r.output
    assert not (tmp_path / "m").exists()


def _refused_resumes(world, tmp_path, run_dir, kw, match, cold_match):
    """Resuming `run_dir` with `kw` is refused (`match`) and leaves its files as they were; so is
    resuming, with `kw`, a run that was not warm-started (`cold_match`)."""
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(SdmError, match=match):
        train(cfg(world["B"], run_dir, max_steps=9, resume=True, **kw), progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    no_warm = tmp_path / "cold"
    train(cfg(world["B"], no_warm, max_steps=2, epochs=5), progress=False)
    with pytest.raises(SdmError, match=cold_match):
        train(cfg(world["B"], no_warm, max_steps=4, resume=True, **kw), progress=False)


def test_distill_resume_is_exact_and_refuses_a_changed_previous_model(world, tmp_path):
    """3 steps, a resume (without --init-from: last.pt's record names the previous model) and 3 more equal 6
    steps; once the previous model is replaced, the resume is refused in one line and nothing is removed."""
    import shutil

    prev = tmp_path / "M1"
    shutil.copytree(world["M1"], prev)
    full, half = tmp_path / "full", tmp_path / "half"
    kw = dict(epochs=5, distill_weight=1.0)
    train(cfg(world["B"], full, max_steps=6, init_from=prev, **kw), progress=False)
    train(cfg(world["B"], half, max_steps=3, init_from=prev, **kw), progress=False)
    train(cfg(world["B"], half, max_steps=6, resume=True, **kw), progress=False)
    a, b = weights(full / "last.pt"), weights(half / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ckpt = torch.load(prev / "best.pt", weights_only=True)
    ckpt["step"] += 1
    torch.save(ckpt, prev / "best.pt")
    _refused_resumes(world, tmp_path, half, kw, "no longer the model this run started from",
                     "was not started with --init-from")  # fmt: skip


@pytest.mark.parametrize("loss", ["full", "sampled", "inbatch"])
def test_cli_distill_end_to_end(world, tmp_path, loss):
    out = tmp_path / "M2"
    args = ["train", "--data", str(world["B"]), "--out", str(out), "--init-from", str(world["M1"]), "--loss", loss,
            "--distill-weight", "0.5", "--epochs", "1", "--batch-size", "8", "--embedding-dim", "16",
            *([] if loss == "full" else ["--num-negatives", "8"])]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"[train] keeping the scores of {world['M1']} (--distill-weight 0.5)" in r.stderr
    assert json.loads((out / "config.json").read_text())["distill_weight"] == 0.5
    best = torch.load(out / "best.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


# --- --new-item-lr-scale: the items new since the previous model learn faster --------------------------------


def _one_step(run, pace):
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    train_step(run.model, run.net, run.opt, _batch(run), run.sampler, run.gen, run.cfg, 0.01, nullcontext(),
               run.loss_kind, None, pace)  # fmt: skip
    return {n: p.detach() - before[n] for n, p in run.model.named_parameters()}


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_new_item_lr_scale_moves_the_new_rows_k_times_as_far(world, tmp_path, loss):
    """One step from the same weights, moments and batch: with a scale of 10 the new items' id rows
    move 10 times as far as with 1, and every other weight exactly as far."""
    from sdm.pipeline.newrows import new_item_pace

    moved = {}
    for k in (1.0, 10.0):
        run = build_run(cfg(world["B"], tmp_path / f"k{k:g}", init_from=world["M1"], new_item_lr_scale=k, loss=loss,
                            dropout=0.0), 0, 1, 0.0)  # fmt: skip
        pace = new_item_pace(run.cfg, run.model, run.init_from)
        assert pace is None if k == 1 else (pace.first, pace.rows, pace.scale) == (22, 10, 10.0)
        moved[k] = _one_step(run, pace)
    new_rows = moved[1.0][ITEM_ID][22:]
    assert new_rows.abs().sum(1).gt(0).sum() >= 3  # the batch moved several new items
    torch.testing.assert_close(moved[10.0][ITEM_ID][22:], 10 * new_rows, rtol=1e-4, atol=1e-7)
    for name, step in moved[1.0].items():
        other = moved[10.0][name]
        if name == ITEM_ID:
            step, other = step[:22], other[:22]
        torch.testing.assert_close(other, step, rtol=0, atol=0, msg=name)


def test_a_new_item_lr_scale_out_of_range_is_refused(world, tmp_path):
    args = ["train", "--data", str(world["B"]), "--out", str(tmp_path / "m"), "--init-from", str(world["M1"])]
    for bad in ("0", "-1", "nan"):
        r = CliRunner().invoke(app, [*args, "--new-item-lr-scale", bad])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert r.output.startswith("error: --new-item-lr-scale: invalid") and "(0, 1000]" in r.output


def test_new_item_lr_scale_resumes_exactly(world, tmp_path):
    """3 steps, a resume (last.pt's record says which rows are new) and 3 more equal 6 steps, and
    differ from 6 steps at scale 1; a last.pt that does not say is refused in one line."""
    full, half, plain = tmp_path / "full", tmp_path / "half", tmp_path / "plain"
    kw = dict(epochs=5, new_item_lr_scale=10.0)
    train(cfg(world["B"], full, max_steps=6, init_from=world["M1"], **kw), progress=False)
    train(cfg(world["B"], half, max_steps=3, init_from=world["M1"], **kw), progress=False)
    assert torch.load(half / "last.pt", weights_only=True)["init_from"]["items_before"] == 22
    train(cfg(world["B"], half, max_steps=6, resume=True, **kw), progress=False)
    train(cfg(world["B"], plain, max_steps=6, init_from=world["M1"], epochs=5), progress=False)
    a, b, c = weights(full / "last.pt"), weights(half / "last.pt"), weights(plain / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the new rows start at zero: at 10x the learning rate they went several times as far
    assert a[ITEM_ID][22:].norm() > 3 * c[ITEM_ID][22:].norm() > 0
    ckpt = torch.load(half / "last.pt", weights_only=True)
    del ckpt["init_from"]["items_before"]  # as an older sdm wrote it
    torch.save(ckpt, half / "last.pt")
    _refused_resumes(world, tmp_path, half, kw, "does not record one", "acts only on a run started with --init-from")


def test_cli_new_item_lr_scale_says_what_it_does(world, tmp_path):
    out = tmp_path / "M2"
    args = ["train", "--data", str(world["B"]), "--out", str(out), "--init-from", str(world["M1"]),
            "--new-item-lr-scale", "10", "--epochs", "1", "--batch-size", "8", "--embedding-dim", "16",
            "--num-negatives", "8"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "[train] the 10 new items' id embeddings learn at 10x the learning rate" in r.stderr
    assert json.loads((out / "config.json").read_text())["new_item_lr_scale"] == 10.0
    # the same command on the previous model's own data: no new item, said rather than ignored
    same = [*args[:1], "--data", str(world["A"]), "--out", str(tmp_path / "M3"), *args[5:]]
    r = CliRunner().invoke(app, same)
    assert r.exit_code == 0, r.output
    assert "learn at" not in r.stderr
    assert "note: --new-item-lr-scale 10: no item is new since the previous model" in r.stderr


DDP_DISTILL_SCRIPT = """
import sys, torch
from sdm.config import TrainConfig
from sdm.pipeline.distill import build_teacher
from sdm.pipeline.stepplan import setup_distributed
from sdm.pipeline.train import build_run, train
data, out, init, dump = sys.argv[1:]
cfg = TrainConfig(data=data, out=out, init_from=init, batch_size=4, embedding_dim=16, num_negatives=8, epochs=1,
                  device="cpu", distill_weight=1.0, new_item_lr_scale=10.0)
rank, world = setup_distributed("cpu")
run = build_run(cfg, rank, world, 0.0)
torch.save(build_teacher(cfg, run.model_cfg, run.manifest, run.init_from, run.device).state_dict(), f"{dump}/t{rank}.pt")
if rank == 0:
    torch.save(run.model.state_dict(), f"{dump}/model0.pt")
del run
train(cfg, progress=False)
"""


def test_torchrun_two_processes_distill_from_the_same_previous_model(world, tmp_path):
    """Every rank builds rank 0's warm-started weights as the previous model, and the run trains (with
    the new items' faster learning rate too)."""
    out = _torchrun(DDP_DISTILL_SCRIPT, world, tmp_path)
    t0, t1, m0 = (torch.load(tmp_path / f, weights_only=True) for f in ("t0.pt", "t1.pt", "model0.pt"))
    for k in m0:
        torch.testing.assert_close(t0[k], m0[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(t1[k], m0[k], rtol=0, atol=0, msg=k)
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["distill_weight"], resolved["new_item_lr_scale"]) == (1.0, 10.0)
    assert (out / "best.pt").is_file()
