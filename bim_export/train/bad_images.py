"""The unreadable images a training run met: counted, and each named once.

Every loader worker reports the images it passed over with the batch (see
:class:`~bim_export.train.loader.Batch`); the training process adds them up as it takes each batch.
At log and save steps the processes of a distributed run pool what they met, so the record is the
run's whole, the same on every rank. A file is named once: one line in the run's log and its first
``log.jsonl`` line (``bad_images_new``); every later line carries the totals (``bad_images``: files,
``replaced``: replacements so far). ``metrics.json`` keeps the record (``bad_images``), and a resumed
run starts from it, so it names no file twice and counts as an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable

from .distributed import DistInfo

NAMED_IN_SUMMARY = 3


class BadImages:
    """The unreadable images met so far.

    Args:
        root: the data folder, for messages.
        record: ``metrics.json``'s ``bad_images`` of the checkpoint resumed from, if any.
        announce: prints a line to the run's log (on the main process; None: silent).
    """

    def __init__(self, root, record: dict | None = None, announce: Callable[[str], None] | None = None):
        self.root = root
        self.names: dict[str, str] = dict((record or {}).get("names", {}))  # name -> reason, in order met
        self.replaced = int((record or {}).get("replaced", 0))
        self.announce = announce
        self._met: list[tuple[str, str]] = []  # since the last pooling
        self._new: dict[str, str] = {}  # pooled, not yet in log.jsonl

    @property
    def count(self) -> int:
        return len(self.names)

    def add(self, skipped: list[tuple[str, str]]) -> None:
        """Records the (name, reason) pairs of one batch."""
        self._met += skipped

    def pool(self, info: DistInfo) -> dict:
        """Pools every process's images met since the last call; returns the ``log.jsonl`` fields.

        Called by every process at the same steps (a collective under torchrun).
        """
        parts = [self._met]
        if info.enabled:
            import torch.distributed as dist

            parts = [None] * info.world_size
            dist.all_gather_object(parts, self._met, group=info.group)
        self._met = []
        for met in parts:
            self.replaced += len(met)
            for name, reason in met:
                if name not in self.names:
                    self.names[name] = self._new[name] = reason
                    if self.announce is not None:
                        self.announce(f"{self.root}: unreadable image {name} ({reason}); replaced by the next "
                                      f"image of the stream whenever met")
        if not self.names:
            return {}
        fields = {"bad_images": self.count, "replaced": self.replaced}
        if self._new:
            fields["bad_images_new"], self._new = self._new, {}
        return fields

    def record(self) -> dict | None:
        """The ``metrics.json`` entry: files, replacements, and every file named with its fault."""
        if not self.names:
            return None
        return {"count": self.count, "replaced": self.replaced, "names": dict(self.names)}

    def summary(self) -> str | None:
        """One line for the run's summary (None when every image was readable)."""
        if not self.names:
            return None
        first = "; ".join(f"{n} ({why})" for n, why in list(self.names.items())[:NAMED_IN_SUMMARY])
        more = f"; +{self.count - NAMED_IN_SUMMARY} more" if self.count > NAMED_IN_SUMMARY else ""
        return (f"  unreadable images: {self.count} file{'s' * (self.count != 1)}, replaced {self.replaced} "
                f"time{'s' * (self.replaced != 1)} by the next image of the stream: {first}{more} "
                f"(all in metrics.json)")
