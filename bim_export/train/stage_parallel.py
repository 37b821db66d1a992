"""Stage-parallel BIM: each group of ranks holds some stages; only forward activations cross.

BIM stops the gradient between stages, so stage ``k`` needs stage ``k - 1``'s detached output and
never sends a gradient back. Under ``torchrun`` with ``stage_parallel: S`` the stages are cut into S
runs of neighbouring stages, one per group of ``N / S`` ranks (2-D: stage group x data rank; global
rank ``g * (N / S) + d``). A group's ranks are data parallel among themselves (their gradients are
averaged within the group, see :class:`~bim_export.train.distributed.GradientReducer`), and data
rank ``d`` of group ``g`` sends its micro-batch's output tokens to data rank ``d`` of group ``g + 1``
with point-to-point calls, several in flight. Stage ``k``'s output at step ``t`` depends only on its
own weights at step ``t``, so group ``g`` goes on to step ``t + 1`` while group ``g + 1`` still works on
step ``t``: after a short fill every group computes at once, the weights are never stale, and the
result is the single process's (up to the order of the data-parallel sums).

Only the tokens cross: masks and target pixels are recomputed by every group from the seeded
``(seed, step)`` stream (:mod:`bim_export.train.loader`), which moves fewer bytes. Per image of
ViT-B/16 at 224 px, mask ratio 0.75: the tokens are (1 + 49) x 768 fp32 values (153.6 kB); the
target would add 196 x 768 fp32 values (602 kB; 150 kB as uint8 pixels) and the mask indices
2 x 196 int64 (3.1 kB), 4 to 5 times the traffic. Recomputing costs each group the decoding of its
images, which the loader workers do beside the step.

Each rank keeps only its stages' weights, optimizer state and gradients (the patch embedding is the
first stage's). At a save rank 0 gathers the groups' shares and writes the single process's checkpoint.

Faults: every point-to-point and collective call has a timeout (``comm_timeout``), and each rank
bumps a counter in the rendezvous store twice a second. A failed call looks up which rank stopped
(its counter stands still, or it left a failure note) and raises one line naming it and its stages.
torchrun SIGTERMs the other workers about 0.1 s after one dies, before that look-up (1.5 s) ends, and
waits up to 30 s for them to exit: so during the run SIGTERM raises in the training thread, the rank
looks up who stopped, and tells the user (torchrun then restarts the group or reports the failure).
Where no rank stopped (a plain ``scancel`` or Ctrl-C of the launcher), SIGTERM is delivered as usual.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.errors import BimExportError, InputError, TrainingError
from .distributed import DistInfo
from .heartbeat import Heartbeat, LauncherStop, SigTermCatcher, default_sigchld
from .model import BimModel
from .run_state import saved_step

IN_FLIGHT = 4  # sends a group may have outstanding: it runs at most this many micro-batches ahead
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # what a stage's output tokens may be


# ------------------------------------------------------------------------------ layout


def split_stages(costs: list[float], groups: int) -> list[list[int]]:
    """Cuts stages ``0 .. len(costs) - 1`` into ``groups`` runs of neighbours with the smallest
    largest cost (the pipeline runs at the pace of its slowest group)."""
    n = len(costs)
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def solve(first: int, left: int) -> tuple[float, list[int]]:  # -> (max cost, cut points)
        if left == 1:
            return sum(costs[first:]), []
        if (first, left) not in best:
            options = []
            for cut in range(first + 1, n - left + 2):
                rest, cuts = solve(cut, left - 1)
                options.append((max(sum(costs[first:cut]), rest), [cut, *cuts]))
            best[first, left] = min(options, key=lambda o: o[0])
        return best[first, left]

    cuts = [0, *solve(0, groups)[1], n]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def stage_costs(model: BimModel) -> list[float]:
    """Relative compute of each stage: encoder blocks on the visible tokens, the decoder on all."""
    cfg, enc = model.config, model.encoder
    n_keep = int(model.num_patches * (1 - cfg.mask_ratio)) + enc.num_prefix_tokens
    n_all = model.num_patches + enc.num_prefix_tokens
    block = n_keep * enc.embed_dim ** 2
    decoder = cfg.decoder.depth * n_all * cfg.decoder.width ** 2
    return [(end - start) * block + (decoder if end in model.decoded_exits else 0)
            for start, end in model.stage_bounds()]


@dataclass
class StageLayout:
    """Which stages each group of ranks holds; ``data`` ranks per group, ``rank`` this process's."""

    groups: list[list[int]]
    data: int
    rank: int
    bounds: list[tuple[int, int]]

    @property
    def group(self) -> int:
        return self.rank // self.data

    @property
    def data_rank(self) -> int:
        return self.rank % self.data

    @property
    def stages(self) -> list[int]:
        return self.groups[self.group]

    def peer(self, group: int) -> int | None:
        """The rank of ``group`` holding this rank's share of the data (None: no such group)."""
        return group * self.data + self.data_rank if 0 <= group < len(self.groups) else None

    def describe(self, rank: int) -> str:
        """``rank 1 (stage 2 of 2: blocks 3-4)``: a rank and what it holds, stages counted from 1."""
        stages = self.groups[rank // self.data]
        first, last = stages[0], stages[-1]
        which = f"stage {first + 1}" if first == last else f"stages {first + 1}-{last + 1}"
        return (f"rank {rank} ({which} of {len(self.bounds)}: blocks {self.bounds[first][0] + 1}-"
                f"{self.bounds[last][1]})")


def plan_layout(model: BimModel, stage_parallel: int, world_size: int, rank: int, where: str) -> StageLayout:
    """The layout of ``stage_parallel`` groups over ``world_size`` ranks.

    Raises:
        InputError: more groups than stages, or a process count the groups do not divide
            (``where`` names the setting).
    """
    if world_size % stage_parallel:
        raise InputError(f"{where}: {stage_parallel} stage groups do not divide the {world_size} processes "
                         f"(torchrun --nproc_per_node); set a divisor of {world_size} for this launch, e.g. "
                         f"--set stage_parallel=1 for one process")
    if stage_parallel > model.num_stages:
        raise InputError(f"{where}: {stage_parallel} stage groups for {model.num_stages} stages (exits "
                         f"{model.exits}); at most one group per stage")
    groups = split_stages(stage_costs(model), stage_parallel)
    return StageLayout(groups, world_size // stage_parallel, rank, model.stage_bounds())


def release_other_stages(model: BimModel, stages: list[int]) -> None:
    """Frees the weights of every stage not in ``stages`` (size-0 tensors of the same rank, so names
    and the parameter grouping stay as they are)."""
    keep = set(stages)
    for name, p in model.named_parameters():
        if model.stage_of(name) not in keep:
            p.data = p.data.new_empty([0] * p.ndim)


def restore_stages(model: BimModel, state: dict[str, torch.Tensor]) -> None:
    """Puts the weights of released stages back from a full state dict (the run's final model)."""
    for name, p in model.named_parameters():
        if p.numel() == 0 and name in state:
            p.data = state[name].to(p.device, p.dtype)


# ------------------------------------------------------------------------------ the run's share


class StageParallel:
    """This rank's part of a stage-parallel run: its stages, its data group, the pipe to its
    neighbours, the gathering of the checkpoint and the fault lines.

    Args:
        layout: see :func:`plan_layout`.
        info: this process in the whole run.
        timeout_s: how long a call waits for another rank.
        out: the checkpoint directory (named in the fault line).
    """

    def __init__(self, layout: StageLayout, info: DistInfo, timeout_s: float, out):
        self.layout, self.info, self.timeout_s, self.out = layout, info, timeout_s, out
        self.timeout = timedelta(seconds=timeout_s)
        groups = [dist.new_group([g * layout.data + d for d in range(layout.data)])
                  for g in range(len(layout.groups))]  # every rank creates every group, in order
        self.data_info = DistInfo(layout.data_rank, layout.data, info.local_rank, groups[layout.group])
        self.prev, self.next = layout.peer(layout.group - 1), layout.peer(layout.group + 1)
        self.heartbeat = Heartbeat(info.rank, info.world_size, timeout_s)
        self._sends: collections.deque = collections.deque()
        self._recv = None  # (work, buffer) posted ahead of the next message
        # the dtype of the tokens sent and of those received (a middle group does both; each side's
        # first message is a header naming it)
        self._sent_dtype: torch.dtype | None = None
        self._recv_dtype: torch.dtype | None = None
        self._doing = "starting"
        self._term = SigTermCatcher()  # installed by guard()
        self.saved_step: int | None = None

    @property
    def stages(self) -> list[int]:
        return self.layout.stages

    def describe(self) -> str:
        """The layout in one line: each group's first rank and what it holds."""
        lay = self.layout
        ranks = "rank" if lay.data == 1 else "data-parallel ranks"
        return (f"stage_parallel: {len(lay.groups)} groups of {lay.data} {ranks}: "
                + ", ".join(lay.describe(g * lay.data) for g in range(len(lay.groups))))

    def decoded(self, model: BimModel) -> list[int]:
        """The exits with a decoder among this rank's stages."""
        return [model.exits[i] for i in self.stages if model.exits[i] in model.decoded_exits]

    # -------------------------------------------------------------- activations

    def send(self, tokens: torch.Tensor, step: int) -> None:
        """Sends a micro-batch's output tokens to the next group, without waiting for it (at most
        ``IN_FLIGHT`` outstanding)."""
        self._term.check()
        if self.next is None:
            return
        tokens = tokens.contiguous()
        self._doing = f"sending step {step + 1}'s tokens to {self.layout.describe(self.next)}"
        if self._sent_dtype is None:  # once: the receiver allocates its buffers in this dtype
            self._sent_dtype = tokens.dtype
            header = torch.tensor([DTYPES.index(tokens.dtype)], dtype=torch.int64, device=tokens.device)
            self._sends.append((dist.isend(header, self.next), header))
        self._sends.append((dist.isend(tokens, self.next), tokens))
        while len(self._sends) > IN_FLIGHT:
            self._sends.popleft()[0].wait(self.timeout)

    def recv(self, shape: tuple[int, ...], device: torch.device, step: int, more: bool) -> torch.Tensor:
        """The previous group's tokens of the next micro-batch [B, L, D]; posts the receive of the
        one after it when ``more``, so that it arrives while this one is computed."""
        self._term.check()
        self._doing = f"waiting for step {step + 1}'s tokens from {self.layout.describe(self.prev)}"
        if self._recv_dtype is None:
            header = torch.empty(1, dtype=torch.int64, device=device)
            dist.irecv(header, self.prev).wait(self.timeout)
            self._recv_dtype = DTYPES[int(header)]
        if self._recv is None:
            self._recv = self._post(shape, device)
        work, buf = self._recv
        work.wait(self.timeout)
        self._recv = self._post(shape, device) if more else None
        return buf

    def _post(self, shape, device):
        buf = torch.empty(shape, dtype=self._recv_dtype, device=device)
        return dist.irecv(buf, self.prev), buf

    def flush(self) -> None:
        """Waits until every send has been taken."""
        if self.next is None:
            return
        self._doing = f"handing the last tokens to {self.layout.describe(self.next)}"
        while self._sends:
            self._sends.popleft()[0].wait(self.timeout)

    # -------------------------------------------------------------- the checkpoint

    def gather(self, share: dict, step: int) -> list[dict] | None:
        """Every group's ``share`` of step ``step`` (its weights, optimizer state, losses: a tree of
        dicts) on rank 0's CPU, in group order; None on the other ranks. Each group's first data rank
        sends its share: the tree without its tensors first, then the tensors one by one, so that
        neither side holds a pickled copy, and a GPU holds one received tensor at a time."""
        self._term.check()
        self._doing = f"gathering step {step}'s checkpoint"
        lay = self.layout
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        if self.info.rank == 0:
            shares = [_cpu(share)]
            for g in range(1, len(lay.groups)):
                got = [None]
                dist.recv_object_list(got, src=g * lay.data)
                tree, specs = got[0]
                tensors = []
                for shape, dtype in specs:
                    buf = torch.empty(shape, dtype=dtype, device=comm or "cpu")
                    dist.recv(buf, src=g * lay.data)
                    tensors.append(buf.cpu())
                shares.append(_fill(tree, iter(tensors)))
            return shares
        if lay.data_rank == 0:
            tensors: list[torch.Tensor] = []
            tree = _strip(share, tensors)
            dist.send_object_list([(tree, [(t.shape, t.dtype) for t in tensors])], dst=0)
            for t in tensors:
                dist.send(t.detach().to(comm or "cpu").contiguous(), dst=0)
        return None

    def saved(self, step: int) -> None:
        """Waits until rank 0 has written step ``step``'s checkpoint (the one a fault line names)."""
        self._doing = f"waiting for step {step}'s checkpoint to be written"
        if self.info.rank == 0:  # it has written it
            self.saved_step = step
        dist.barrier()
        self.saved_step = step

    # -------------------------------------------------------------- faults

    @contextlib.contextmanager
    def guard(self):
        """Turns a failed call to another rank, or torchrun's SIGTERM after another rank died, into one
        line naming the rank that stopped (a :class:`TrainingError`, which replaces the SIGTERM)."""
        term = self._term
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, term) if main else None
        try:
            yield
        except BimExportError as e:
            self.heartbeat.note_failure(str(e))
            raise
        except (RuntimeError, LauncherStop) as e:
            term.hold = True  # the look-up below runs to its end; a SIGTERM now only marks itself
            with default_sigchld(main):  # the loader workers got the SIGTERM too: not an error here
                stopped = isinstance(e, LauncherStop)
                comm = isinstance(e, dist.DistError)
                if not stopped:  # first the note, so that the ranks looking for the one that stopped
                    first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__  # skip this one
                    self.heartbeat.note_failure(f"lost contact while {self._doing}" if comm else first)
                found = self.heartbeat.stopped()
            if stopped and (found is None or not any(found)):
                raise  # stopped by the launcher, no rank gone: the SIGTERM it was (delivered below)
            if not stopped and not comm and found is not None and not any(found):
                raise  # not a call to another rank, and every rank is there: a bug, kept with its traceback
            term.pending = False  # the line replaces the SIGTERM: the process exits with it
            raise TrainingError(self._fault_line(found, e)) from None if stopped else e
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
                if term.pending:
                    signal.raise_signal(signal.SIGTERM)

    def _fault_line(self, found, error: Exception) -> str:
        me = self.layout.describe(self.info.rank)
        on_disk = saved_step(Path(self.out))  # where rank 0 wrote it before this rank heard back
        step = on_disk if on_disk is not None else self.saved_step
        kept = (f"the last checkpoint {self.out} (step {step}) is intact: rerun with --resume to continue "
                f"from it" if step is not None else "no checkpoint was saved yet")
        if found is None:
            what = "rank 0 (and the rendezvous store with it) is gone"
        else:
            gone, notes = found
            if gone:
                what = (f"{', '.join(self.layout.describe(r) for r in gone)} stopped (its heartbeat stopped: "
                        f"the process is gone or frozen)")
            elif notes:
                r, note = next(iter(sorted(notes.items())))
                what = f"{self.layout.describe(r)} stopped: {note}"
            else:
                what = f"no answer within comm_timeout {self.timeout_s:g} s ({str(error).splitlines()[0][:120]})"
        return f"stage-parallel training stopped: {what}; seen by {me} while {self._doing}; {kept}"

    def close(self) -> None:
        self.heartbeat.close()


# ------------------------------------------------------------------------------ trees of tensors


class _Slot:  # where a tensor stood in a share sent without its tensors
    pass


def _strip(tree, tensors: list[torch.Tensor]):
    """``tree`` with each tensor replaced by a slot, the tensors appended to ``tensors`` in order."""
    if isinstance(tree, dict):
        return {k: _strip(v, tensors) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return _Slot()
    return tree


def _fill(tree, tensors):
    """The inverse of :func:`_strip`: the slots filled from the iterator ``tensors``."""
    if isinstance(tree, dict):
        return {k: _fill(v, tensors) for k, v in tree.items()}
    return next(tensors) if isinstance(tree, _Slot) else tree


def _cpu(tree):  # ``tree`` with its tensors on the CPU
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    return tree.detach().cpu() if isinstance(tree, torch.Tensor) else tree
