"""Write a small shard directory by hand, straight from docs/FORMAT.md.

Values are predictable: user u (0-based) has sessions whose items are
2 + (u * 7 + k) % n_items for consecutive k, so tests can tell every session
apart by its `sess_id` and check that each arrives exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sdm.manifest import file_table  # noqa: F401 - the test builders seal their manifests with it

HOUR_US = 3_600_000_000


def build_shards(
    root: Path,
    n_users: int = 12,
    sessions_per_user: int = 3,
    session_len: int = 4,
    n_items: int = 20,
    n_shards: int = 4,
    max_long_len: int = 5,
) -> Path:
    """Write train/valid/test shards with a category feature and an age profile; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    num_items = n_items + 2
    cat = {i: 2 + (i % 3) for i in range(2, num_items)}
    splits: dict = {}
    sess_id = 0
    for split_no, split in enumerate(("train", "valid", "test")):
        rows = []
        for u in range(n_users):
            ts, items = [], []
            starts, lens, lstart, lend, ids = [], [], [], [], []
            k = 0
            for s in range(sessions_per_user):
                start = len(items)
                # Length varies (1..session_len) so some sessions give no sample.
                length = 1 + (u + s) % session_len
                for j in range(length):
                    ts.append((split_no * 100 + s * 2) * HOUR_US + j * 60_000_000 + u)
                    items.append(2 + (u * 7 + k) % n_items)
                    k += 1
                starts.append(start)
                lens.append(length)
                lend.append(start)
                lstart.append(max(0, start - max_long_len))
                ids.append(sess_id)
                sess_id += 1
            rows.append(
                {
                    "user_id": f"u{u}",
                    "user": 2 + u if split == "train" else 1,
                    "user_age": 2 + u % 4,
                    "ts": ts,
                    "seq_item": items,
                    "seq_category": [cat[i] for i in items],
                    "sess_id": ids,
                    "sess_start": starts,
                    "sess_len": lens,
                    "long_start": lstart,
                    "long_end": lend,
                }
            )
        schema = pa.schema(
            [
                ("user_id", pa.string()),
                ("user", pa.int32()),
                ("user_age", pa.int32()),
                ("ts", pa.list_(pa.int64())),
                ("seq_item", pa.list_(pa.int32())),
                ("seq_category", pa.list_(pa.int32())),
                ("sess_id", pa.list_(pa.int64())),
                ("sess_start", pa.list_(pa.int32())),
                ("sess_len", pa.list_(pa.int32())),
                ("long_start", pa.list_(pa.int32())),
                ("long_end", pa.list_(pa.int32())),
            ]
        )
        (root / split).mkdir(exist_ok=True)
        shards = []
        per = -(-n_users // n_shards)
        for i in range(n_shards):
            part = rows[i * per : (i + 1) * per]
            path = f"{split}/part-{i:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(part, schema=schema), root / path)
            n_sess = sum(len(r["sess_len"]) for r in part)
            samples = sum(max(x - 1, 0) for r in part for x in r["sess_len"])
            events = sum(sum(r["sess_len"]) for r in part)
            shards.append({"path": path, "rows": len(part), "sessions": n_sess, "events": events, "samples": samples})
        splits[split] = {
            "users": n_users,
            "sessions": sum(s["sessions"] for s in shards),
            "events": sum(s["events"] for s in shards),
            "samples": sum(s["samples"] for s in shards),
            "shards": shards,
        }
    (root / "vocab").mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"raw": [f"i{i}" for i in range(2, num_items)], "index": pa.array(range(2, num_items), pa.int32()),
                  "count": [10 + i for i in range(2, num_items)]}),
        root / "vocab" / "item.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"item": pa.array(range(2, num_items), pa.int32()), "item_id": [f"i{i}" for i in range(2, num_items)],
                  "category": pa.array([cat[i] for i in range(2, num_items)], pa.int32())}),
        root / "items.parquet",
    )  # fmt: skip
    manifest = {
        "format": "sdm-shards",
        "version": 1,
        "fingerprint": "test-fingerprint",
        "item_features": ["item", "category"],
        "user_features": ["user", "age"],
        "vocab_sizes": {"item": num_items, "category": 5, "user": n_users + 2, "age": 6},
        "num_items": num_items,
        "max_session_len": 50,
        "max_long_len": max_long_len,
        "splits": splits,
        "dropped": {},
    }
    write_plain_vocabs(root, manifest["vocab_sizes"])
    manifest["files"] = file_table(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_plain_vocabs(root: Path, sizes: dict[str, int]) -> None:
    """A vocabulary file for every feature that has none yet: raw value "v<i>" at index i (2..size-1)."""
    for name, size in sizes.items():
        path = root / "vocab" / f"{name}.parquet"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            pq.write_table(
                pa.table({"raw": [f"v{i}" for i in range(2, size)], "index": pa.array(range(2, size), pa.int32()),
                          "count": pa.array([1] * (size - 2), pa.int64())}),
                path,
            )  # fmt: skip
