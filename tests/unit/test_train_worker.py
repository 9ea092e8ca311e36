"""The training loop's epoch step outside Ray: in-memory shards and one epoch of the real model."""

import math

import numpy as np
import pandas as pd
import torch

from jobs.predictor import Architecture
from jobs.train_worker import EpochLoop, TensorShard


def columns(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "c0": rng.integers(0, 5, rows),
            "n0": rng.normal(size=rows).astype(np.float32),
            "y": np.arange(rows) % 2,
        }
    )


def batches(shard: TensorShard, batch_size: int, training: bool) -> list[dict[str, torch.Tensor]]:
    return list(
        shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=training,
            local_shuffle_buffer_size=batch_size * 8 if training else None,
            device="cpu",
        )
    )


def test_evaluation_batches_keep_every_row_in_order():
    frame = columns(10)
    got = batches(TensorShard.from_frame(frame, seed=1), 4, training=False)
    assert [len(b["y"]) for b in got] == [4, 4, 2]
    assert torch.cat([b["n0"] for b in got]).tolist() == frame["n0"].tolist()


def test_training_batches_drop_the_remainder_and_reshuffle_every_epoch():
    frame = columns(10)
    shard = TensorShard.from_frame(frame, seed=1)
    first, second = batches(shard, 4, training=True), batches(shard, 4, training=True)
    assert [len(b["y"]) for b in first] == [4, 4]
    values = torch.cat([b["n0"] for b in first]).tolist()
    assert len(set(values)) == 8 and set(values) <= set(frame["n0"].tolist())
    assert values != torch.cat([b["n0"] for b in second]).tolist()


def test_one_epoch_of_the_real_model_without_ray():
    frame = columns(64)
    cfg = {
        "task": "classification",
        "n_cat": 1,
        "n_num": 1,
        "batch_size": 16,
        "device": torch.device("cpu"),
        "lr": 1e-2,
        "weight_decay": 0.0,
        "lr_decay": 0.5,
        "lr_patience": 1,
        "patience": 2,
    }
    model = Architecture(
        cardinalities=[5], n_numeric=1, n_outputs=2, hidden=[8], dropout=0.0, max_embedding_dim=4
    ).build()
    loop = EpochLoop.create(model, cfg)
    shard = TensorShard.from_frame(frame, seed=0)
    metrics, rows = loop.run_epoch(0, shard, shard)
    assert rows == 64
    assert math.isfinite(metrics["train_loss"]) and metrics["best_val_loss"] == metrics["val_loss"]
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["train_rows_per_s"] > 0
    assert loop.state(0)["epoch"] == 0 and not loop.should_stop


def test_shares_of_in_memory_columns_cover_the_rows_once_and_training_shares_are_equal():
    frame = columns(11)
    arrays = {name: frame[name].to_numpy() for name in frame.columns}
    arrays["n0"].setflags(write=False)  # as the object store hands them out
    train = [TensorShard.share_of(arrays, rank, 3, equal=True, seed=rank) for rank in range(3)]
    val = [TensorShard.share_of(arrays, rank, 3, equal=False, seed=rank) for rank in range(3)]
    # DDP: as many training rows (and so steps) on every rank, the remainder left out.
    assert [s.rows for s in train] == [3, 3, 3]
    assert [s.rows for s in val] == [4, 4, 3]
    seen = sorted(v for s in val for v in s.columns["n0"].tolist())
    assert seen == sorted(frame["n0"].tolist())
    trained = [v for s in train for v in s.columns["n0"].tolist()]
    assert len(set(trained)) == 9 and set(trained) <= set(frame["n0"].tolist())
    assert all(s.columns["c0"].dtype == torch.int64 and s.columns["n0"].dtype == torch.float32 for s in train)
