"""Write a shard directory (docs/FORMAT.md) from hand-made sessions of raw item ids.

Used by the evaluation and baseline tests, whose expected values are computed
by eye from the sessions. The item vocabulary is built from the training
sessions (descending count, ties by raw id); other items become OOV (1).
Sessions of a user are 10 hours apart, events one minute apart; long-term
windows are empty.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shard_builder import file_table, write_plain_vocabs

HOUR_US = 3_600_000_000
MINUTE_US = 60_000_000

Sessions = dict[str, list[tuple[str, list[list[str]]]]]  # split -> [(user_id, [session items])]


def item_vocab(sessions: Sessions) -> dict[str, int]:
    """raw item -> index, from the training sessions."""
    counts = Counter(i for _, ss in sessions.get("train", []) for s in ss for i in s)
    ranked = sorted(counts, key=lambda r: (-counts[r], r))
    return {raw: 2 + n for n, raw in enumerate(ranked)}


def write_session_shards(root: Path, sessions: Sessions, fingerprint: str = "fp-test") -> Path:
    """Write one shard per split (empty splits allowed); returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = item_vocab(sessions)
    counts = Counter(i for _, ss in sessions.get("train", []) for s in ss for i in s)
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("user", pa.int32()),
            ("ts", pa.list_(pa.int64())),
            ("seq_item", pa.list_(pa.int32())),
            ("seq_oov", pa.list_(pa.int64())),
            ("sess_id", pa.list_(pa.int64())),
            ("sess_start", pa.list_(pa.int32())),
            ("sess_len", pa.list_(pa.int32())),
            ("long_start", pa.list_(pa.int32())),
            ("long_end", pa.list_(pa.int32())),
        ]
    )
    users = sorted({u for rows in sessions.values() for u, _ in rows})
    user_index = {u: 2 + n for n, u in enumerate(users)}
    splits = {}
    sess_id = 0
    for split_no, split in enumerate(("train", "valid", "test")):
        rows = []
        for user, user_sessions in sessions.get(split, []):
            ts, items, oov, starts, lens, ids = [], [], [], [], [], []
            for s_no, sess in enumerate(user_sessions):
                starts.append(len(items))
                lens.append(len(sess))
                ids.append(sess_id)
                sess_id += 1
                for j, raw in enumerate(sess):
                    ts.append((split_no * 1000 + s_no * 10) * HOUR_US + j * MINUTE_US)
                    items.append(vocab.get(raw, 1))
                    oov.append(0 if raw in vocab else 1000 + ord(raw[0]))  # any distinct id per unknown raw item
            rows.append(
                {"user_id": user, "user": user_index[user], "ts": ts, "seq_item": items, "seq_oov": oov, "sess_id": ids,
                 "sess_start": starts, "sess_len": lens, "long_start": starts, "long_end": starts}
            )  # fmt: skip
        path = f"{split}/part-00000.parquet"
        (root / split).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / path)
        lens_all = [x for r in rows for x in r["sess_len"]]
        stats = {"sessions": len(lens_all), "events": sum(lens_all), "samples": sum(max(x - 1, 0) for x in lens_all)}
        splits[split] = {"users": len(rows), **stats, "shards": [{"path": path, "rows": len(rows), **stats}]}
    (root / "vocab").mkdir(exist_ok=True)
    raws = sorted(vocab, key=vocab.get)
    pq.write_table(
        pa.table({"raw": raws, "index": pa.array([vocab[r] for r in raws], pa.int32()),
                  "count": pa.array([counts[r] for r in raws], pa.int64())}),
        root / "vocab" / "item.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"item": pa.array([vocab[r] for r in raws], pa.int32()), "item_id": raws}), root / "items.parquet"
    )
    manifest = {
        "format": "sdm-shards",
        "version": 1,
        "fingerprint": fingerprint,
        "item_features": ["item"],
        "user_features": ["user"],
        "vocab_sizes": {"item": len(vocab) + 2, "user": len(users) + 2},
        "num_items": len(vocab) + 2,
        "max_session_len": 50,
        "max_long_len": 50,
        "splits": splits,
        "dropped": {},
    }
    write_plain_vocabs(root, manifest["vocab_sizes"])
    manifest["files"] = file_table(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
