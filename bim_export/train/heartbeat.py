"""How a stage-parallel rank tells which other rank stopped: heartbeats and failure notes in the
rendezvous store, and the SIGTERM torchrun sends the other workers once one has failed.

torchrun polls its workers every 0.1 s; when one has died it SIGTERMs the rest and gives them 30 s
to exit before SIGKILL (``torch.distributed.elastic.multiprocessing.api``). A rank that sees a call
to the dead one fail needs 3 beats (1.5 s) to tell which rank stopped, so during a stage-parallel run
SIGTERM raises :class:`LauncherStop` in the training thread, and is held while the look-up runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

BEAT_S = 0.5  # heartbeat period; a rank whose counter stands still for 3 periods is gone


class Heartbeat:
    """Each rank's counter in the rendezvous store, bumped every ``BEAT_S`` by a daemon thread, and
    failure notes: enough to tell which rank stopped when a call to it fails."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.prefix, self.rank, self.world = f"bim-stage-parallel/{run}", rank, world_size
        # a client of its own: the store's calls are not shared with the training thread's
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=min(timeout_s, 30)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="bim-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        with contextlib.suppress(Exception):  # the store going away is reported by the caller's lookup
            while not self._stop.wait(BEAT_S):
                self.store.add(f"{self.prefix}/beat/{self.rank}", 1)

    def note_failure(self, message: str) -> None:
        with contextlib.suppress(Exception):
            self.store.set(f"{self.prefix}/failed/{self.rank}", message)

    def stopped(self) -> tuple[list[int], dict[int, str]] | None:
        """(ranks whose counter stood still for 3 beats and left no note, {rank: note}); None when
        the store itself is gone (it lives with rank 0 when torchrun's agent does not hold it)."""
        try:
            keys = [f"{self.prefix}/beat/{r}" for r in range(self.world)]
            before = [self.store.add(k, 0) for k in keys]
            time.sleep(3 * BEAT_S)
            after = [self.store.add(k, 0) for k in keys]
            notes, done = {}, set()
            for r in range(self.world):
                key = f"{self.prefix}/failed/{r}"
                if r != self.rank and self.store.check([key]):
                    notes[r] = self.store.get(key).decode()
                if self.store.check([f"{self.prefix}/done/{r}"]):
                    done.add(r)
        except Exception:  # noqa: BLE001 - any failure to reach the store means it is gone
            return None
        return [r for r in range(self.world)
                if r != self.rank and before[r] == after[r] and r not in notes and r not in done], notes

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)
        with contextlib.suppress(Exception):  # its heartbeat stops because it is done, not gone
            self.store.set(f"{self.prefix}/done/{self.rank}", "done")


class LauncherStop(BaseException):  # not an Exception: no ``except Exception`` on the way may swallow it
    """SIGTERM from the launcher (torchrun stops the other workers once one has failed)."""


class SigTermCatcher:
    """The SIGTERM handler of a stage-parallel run: raises :class:`LauncherStop` in the training
    thread, or, once ``hold`` is set (a fault is being looked up), only records that it came.

    ``pending`` stays set until the SIGTERM is answered (the fault line replaces it, or it is
    delivered again once the handler is gone). An exception raised by a signal handler is lost when
    the handler runs inside a ``__del__`` or a callback (Python prints it and goes on), so the calls
    to other ranks :meth:`check` for it too.
    """

    def __init__(self):
        self.hold = self.pending = False

    def __call__(self, signum, frame) -> None:
        self.pending = True
        if not self.hold:
            raise LauncherStop()

    def check(self) -> None:
        if self.pending and not self.hold:
            raise LauncherStop()


@contextlib.contextmanager
def default_sigchld(main: bool):
    """SIGCHLD's default action while inside: the data loader's handler would raise for its workers,
    which the same SIGTERM ended."""
    if not (main and hasattr(signal, "SIGCHLD")):
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)
