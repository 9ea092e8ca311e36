"""The Ray Train worker side of `jobs.train`: the per-worker loop and the epoch step it runs.

Kept apart from the driver's MLflow, registry and evaluation imports: every Train worker (and every
Tune trial's worker) imports this module to unpickle its function, and `jobs.train`'s imports
(MLflow, scikit-learn, OpenTelemetry) would slow every worker's start-up (benchmarks/README.md).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.phases import WorkerTimings
from jobs.predictor import Architecture

CHECKPOINT_FILE = "state.pt"


def _batch_tensors(batch: dict[str, torch.Tensor], n_cat: int, n_num: int) -> tuple[torch.Tensor, ...]:
    rows, device = len(batch["y"]), batch["y"].device
    x_cat = (
        torch.stack([batch[f"c{j}"] for j in range(n_cat)], dim=1).long()
        if n_cat
        else torch.zeros((rows, 0), dtype=torch.long, device=device)
    )
    x_num = (
        torch.stack([batch[f"n{j}"] for j in range(n_num)], dim=1).float()
        if n_num
        else torch.zeros((rows, 0), dtype=torch.float32, device=device)
    )
    return x_cat, x_num, batch["y"]


def _all_reduce_sums(values: list[float]) -> list[float]:
    """Sum per-worker statistics so every worker takes the same early-stopping decision."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _loss_fn(task: str) -> torch.nn.Module:
    return torch.nn.CrossEntropyLoss(reduction="sum") if task == "classification" else torch.nn.MSELoss(reduction="sum")


def _targets(y: torch.Tensor, task: str) -> torch.Tensor:
    return y.long() if task == "classification" else y.float().unsqueeze(1)


def _run_epoch(
    model: torch.nn.Module,
    shard: Any,
    cfg: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
) -> tuple[float, float, float]:
    """One pass over a shard; returns (loss sum, correct count, rows). Trains if given an optimizer."""
    loss_fn = _loss_fn(cfg["task"])
    loss_sum = correct = rows = 0.0
    training = optimizer is not None
    model.train(training)
    iterator = shard.iter_torch_batches(
        batch_size=cfg["batch_size"],
        drop_last=training,  # a batch of one breaks BatchNorm in training mode
        local_shuffle_buffer_size=cfg["batch_size"] * 8 if training else None,
        device=cfg["device"],
    )
    with torch.set_grad_enabled(training):
        for batch in iterator:
            x_cat, x_num, y = _batch_tensors(batch, cfg["n_cat"], cfg["n_num"])
            out = model(x_cat, x_num)
            target = _targets(y, cfg["task"])
            loss = loss_fn(out, target)
            if optimizer is not None:
                optimizer.zero_grad()
                (loss / len(y)).backward()
                optimizer.step()
            loss_sum += float(loss.detach())
            rows += len(y)
            if cfg["task"] == "classification":
                correct += float((out.argmax(dim=1) == target).sum())
    return loss_sum, correct, rows


class TensorShard:
    """A data set shard held in memory, one tensor per column, with the one method of a Ray Data
    shard that `_run_epoch` calls. Every training epoch draws a fresh permutation of all its rows.

    Ray Data's per-batch iteration costs more than a step of this small model (streaming every
    epoch, Ray Train trained at about a quarter of plain PyTorch's rows/s, benchmarks/training.py):
    workers read their shards once and iterate them from memory when the data is small
    (`jobs.train.cache_shards`).
    """

    def __init__(self, columns: dict[str, torch.Tensor], seed: int) -> None:
        self.columns = columns
        self.rows = len(next(iter(columns.values()))) if columns else 0
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_frame(cls, frame: Any, seed: int, device: torch.device | str = "cpu") -> TensorShard:
        """From `Preprocessor.to_columns` output (the plain-PyTorch path, without Ray)."""
        # A copy: pandas hands out read-only arrays, which torch warns about.
        return cls({str(c): torch.tensor(frame[c].to_numpy(), device=device) for c in frame.columns}, seed)

    @classmethod
    def share_of(
        cls,
        columns: Mapping[str, np.ndarray],
        rank: int,
        world_size: int,
        *,
        equal: bool,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> TensorShard:
        """Rank `rank`'s share of in-memory columns (`jobs.train.training_data`): every
        `world_size`-th row from row `rank`. With `equal`, every rank gets as many rows and the
        remainder none, as Ray Data's `streaming_split(equal=True)` does: DDP needs the same number
        of steps on every rank, or one rank waits forever in a collective the others never join."""
        rows = len(next(iter(columns.values()))) if columns else 0
        stop = rows - rows % world_size if equal else rows
        # A copy: the object store hands out read-only arrays, which torch warns about.
        return cls(
            {str(n): torch.from_numpy(np.array(v[rank:stop:world_size])).to(device) for n, v in columns.items()},
            seed,
        )

    @classmethod
    def from_shard(cls, shard: Any, seed: int, device: torch.device | str = "cpu") -> TensorShard:
        """One pass over a Ray Data shard, whole blocks at a time."""
        parts: dict[str, list[np.ndarray]] = {}
        for batch in shard.iter_batches(batch_size=None, batch_format="numpy"):
            for name, values in batch.items():
                parts.setdefault(name, []).append(values)
        return cls({n: torch.from_numpy(np.concatenate(v)).to(device) for n, v in parts.items()}, seed)

    def iter_torch_batches(
        self, *, batch_size: int, drop_last: bool, local_shuffle_buffer_size: int | None, device: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        columns = self.columns
        if not self.rows:
            return
        if local_shuffle_buffer_size:  # asked for by training passes only
            order = torch.randperm(self.rows, generator=self.generator).to(next(iter(columns.values())).device)
            columns = {name: column[order] for name, column in columns.items()}
        end = self.rows - self.rows % batch_size if drop_last else self.rows
        for start in range(0, end, batch_size):
            yield {name: column[start : start + batch_size].to(device) for name, column in columns.items()}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@dataclass
class EpochLoop:
    """The model, optimiser, LR schedule and early-stopping state of one training loop.

    Needs no Ray Train context: `train_loop_per_worker` drives it on every worker, and the
    plain-PyTorch baseline of `benchmarks.training` drives it in one process, so both measure the
    same per-epoch code. Without an initialised process group the all-reduces are no-ops.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    cfg: dict[str, Any]
    best_loss: float = math.inf
    stale: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, model: torch.nn.Module, cfg: dict[str, Any]) -> EpochLoop:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=cfg["lr_decay"], patience=cfg["lr_patience"]
        )
        return cls(model, optimizer, scheduler, cfg, best_state=_cpu_state(_unwrap(model)))

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.cfg["patience"]

    def state(self, epoch: int) -> dict[str, Any]:
        """What a checkpoint holds to resume after `epoch`."""
        return {
            "model": _cpu_state(_unwrap(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_loss": self.best_loss,
            "stale": self.stale,
            "best_model": self.best_state,
        }

    def restore(self, saved: dict[str, Any]) -> int:
        """Load a checkpoint's state; returns the epoch to continue with."""
        _unwrap(self.model).load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.best_loss, self.stale, self.best_state = saved["best_loss"], saved["stale"], saved["best_model"]
        return int(saved["epoch"]) + 1

    def run_epoch(self, epoch: int, train_shard: Any, val_shard: Any) -> tuple[dict[str, float], int]:
        """Train on one pass over `train_shard`, validate on `val_shard`, step the schedule and the
        early stopping; returns the epoch's metrics and the rows trained on by all workers."""
        cfg, model = self.cfg, self.model
        started = time.perf_counter()
        t_loss, t_correct, t_rows = _all_reduce_sums(list(_run_epoch(model, train_shard, cfg, self.optimizer)))
        train_seconds = time.perf_counter() - started
        v_loss, v_correct, v_rows = _all_reduce_sums(list(_run_epoch(_unwrap(model), val_shard, cfg, None)))
        val_loss = v_loss / max(v_rows, 1)
        self.scheduler.step(val_loss)
        if val_loss < self.best_loss - 1e-5:
            self.best_loss, self.stale = val_loss, 0
            self.best_state = _cpu_state(_unwrap(model))
        else:
            self.stale += 1
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "train_loss": t_loss / max(t_rows, 1),
            "val_loss": val_loss,
            "best_val_loss": self.best_loss,
            "train_rows_per_s": t_rows / max(train_seconds, 1e-9),
            "epoch_time_s": time.perf_counter() - started,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if cfg["task"] == "classification":
            metrics["train_accuracy"] = t_correct / max(t_rows, 1)
            metrics["val_accuracy"] = v_correct / max(v_rows, 1)
        return metrics, int(t_rows)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    loop_started = time.time()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(cfg["seed"] + rank)
    torch.set_num_threads(max(1, cfg["torch_threads"]))
    # The batches land on the worker's device (a GPU when use_gpu), like the model.
    cfg = {**cfg, "device": ray.train.torch.get_device()}
    model = ray.train.torch.prepare_model(
        Architecture.model_validate(cfg["architecture"]).build(),
        parallel_strategy_kwargs={"broadcast_buffers": cfg["ddp_broadcast_buffers"]},
    )
    loop = EpochLoop.create(model, cfg)
    start_epoch = 0

    # Resume where a restarted run left off (worker or node failure).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=cfg["device"], weights_only=False)
        start_epoch = loop.restore(saved)

    tracker = None
    if rank == 0 and cfg.get("run_id"):
        from mlflow.tracking import MlflowClient  # only where it logs: the import is heavy

        tracker = MlflowClient(cfg["tracking_uri"])
    train_shard, val_shard = _shards(cfg, rank, context.get_world_size())
    timings = WorkerTimings(loop_started=loop_started, ready=time.time())
    for epoch in range(start_epoch, cfg["epochs"]):
        metrics, train_rows = loop.run_epoch(epoch, train_shard, val_shard)
        timings.epoch_s.append(metrics["epoch_time_s"])
        logged = time.perf_counter()
        if tracker is not None:
            _log_epoch(tracker, cfg["run_id"], metrics, epoch)
        timings.logging_s.append(time.perf_counter() - logged)
        # Reported to Ray only (not MLflow, where it would be one more curve): the benchmark
        # checks that every variant trained on as many rows.
        reported = {**metrics, "train_rows": float(train_rows)}
        report_started = time.perf_counter()
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                # The timings ride in the checkpoint: the driver cuts the run into its phases
                # (jobs/phases.py) from the last one.
                saved = {**loop.state(epoch), "timings": timings.as_dict()}
                torch.save(saved, Path(directory) / CHECKPOINT_FILE)
                ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(reported)
        timings.report_s.append(time.perf_counter() - report_started)
        if loop.should_stop:
            break


def _shards(cfg: dict[str, Any], rank: int, world_size: int) -> tuple[Any, Any]:
    """This worker's training and validation shards. In-memory columns (`shared_data`, object
    refs): its share of every row, validation included, since only training steps must be as many
    on every rank. Otherwise Ray Data's shards, read once into memory with `cache_shards`."""
    import ray
    import ray.train

    seed, device = cfg["seed"] + rank, cfg["device"]
    shared = cfg.get("shared_data")
    if shared:
        train, val = ray.get([shared["train"], shared["val"]])
        return (
            TensorShard.share_of(train, rank, world_size, equal=True, seed=seed, device=device),
            TensorShard.share_of(val, rank, world_size, equal=False, seed=seed, device=device),
        )
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    if cfg.get("cache_shards"):  # read once here, then every epoch from memory
        return TensorShard.from_shard(train_shard, seed, device), TensorShard.from_shard(val_shard, seed, device)
    return train_shard, val_shard


def _log_epoch(tracker: Any, run_id: str, metrics: dict[str, float], epoch: int) -> None:
    """One epoch's curves in one call: a request per metric added up to a share of a short job."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracker.log_batch(
        run_id, metrics=[Metric(key, value, now, epoch) for key, value in metrics.items() if key != "epoch"]
    )
