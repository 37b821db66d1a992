"""Data-parallel training under ``torchrun`` without DDP's module wrapper.

Why no ``DistributedDataParallel``: its reducer all-reduces gradients during a backward and expects
each forward to be followed by one backward that reaches every parameter. BIM runs one backward per
stage, each reaching only that stage's blocks and decoder, and several per optimizer step with
gradient accumulation; wrapping the stages in ``no_sync`` and syncing on a last backward would still
leave the earlier stages out of it. So each rank accumulates gradients locally, and
:class:`GradientReducer` averages each stage's gradients across ranks as soon as that stage's last
backward of the step ends: one flattened all-reduce per stage and dtype, started without waiting,
so the communication of stage k runs while stage k + 1 computes. The traffic is DDP's, and the result
exactly the gradient of the global batch, since every rank's loss is a mean over an equal share of it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``; ``local_rank`` picks its GPU.

    ``group`` is the process group collectives run over (None: every process). A stage-parallel run
    gives each stage group's data-parallel ranks their own info: ``rank`` and ``world_size`` then count
    within that group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float | None = None) -> DistInfo:
    """Joins the process group when launched by torchrun (``WORLD_SIZE`` > 1): nccl on GPU, gloo on CPU.

    Args:
        timeout_s: how long a collective or point-to-point call waits for the other ranks before it
            fails (None: torch's default).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **timeout,
                                **_attempt_store(timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def _attempt_store(timeout_s: float | None) -> dict:
    """Under torchrun's agent store on one node: the store, rank and world size for
    ``init_process_group``, the keys under this restart's own prefix; else nothing (``env://``).

    The c10d rendezvous keeps one store for all restarts of the worker group (it shares its TCP
    store), and the process group's keys (each rank's address) carry no restart count: after a
    restart a rank may read the address of a worker that died with the previous attempt and fail to
    connect. One node's restart count names the attempt; across nodes it does not (a node restarted
    for another node's failure does not count it), so there torchrun's own opt-out,
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, gives each attempt a fresh store, hosted by rank 0.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and os.environ.get("RANK") == "0":
            log.warning("torchrun restarts across nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
                        "launchers' environment (a restarted worker could read a dead one's address)")
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s or 1800))
    attempt = f"bim/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return {"store": dist.PrefixStore(attempt, store), "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"])}


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Makes every rank start from rank 0's parameters and buffers."""
    if not info.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=dist.get_global_rank(info.group, 0) if info.group is not None else 0,
                       group=info.group)


class GradientReducer:
    """Averages ``.grad`` across ranks, a group of parameters (a stage) at a time, asynchronously.

    :meth:`launch` copies the group's gradients into one flat bucket per dtype and starts an
    all-reduce on it (``async_op=True``); :meth:`wait` waits for it and writes the mean back. Every
    rank must launch the same groups in the same order; a parameter whose ``.grad`` is None on a
    rank contributes zeros there, so ranks never disagree on the bucket layout. In a single process
    both are no-ops.
    """

    def __init__(self, info: DistInfo):
        self.info = info
        self._pending: dict = {}

    def launch(self, key, params: list[torch.nn.Parameter]) -> None:
        if not self.info.enabled:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        buckets = []
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            buckets.append((group, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.info.group,
                                                          async_op=True)))
        self._pending[key] = buckets

    def wait(self, key) -> None:
        """Waits for ``key``'s all-reduce (if one was launched) and stores the mean in ``.grad``."""
        for group, flat, work in self._pending.pop(key, []):
            work.wait()
            flat /= self.info.world_size
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def pending(self) -> list:
        """Keys launched and not yet waited for, in launch order."""
        return list(self._pending)


def average_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``t`` over ranks (for logging and the shared non-finite check)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.group)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.group)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
