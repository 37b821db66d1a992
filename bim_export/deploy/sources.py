"""What a run's candidates are cut from: one or several checkpoints, each at one or several resolutions.

A candidate is (checkpoint, depth, resolution, precision). By default there is one checkpoint at its
own resolution. ``--checkpoint`` may be given several times or name a folder of runs (every sub-folder
that is a checkpoint); a profile's ``resolutions`` (or ``--resolutions``) adds input sizes. Each
(checkpoint, resolution) is one :class:`~bim_export.deploy.workshop.Workshop`, made on first use and
shared by every profile of the run, so each graph is exported once.

Quality must compare like with like:

- at a checkpoint's own resolution it is metrics.json's figure; at another it is measured at that
  resolution (:mod:`bim_export.model.quality`) on the images that scored metrics.json, and those
  must be the same set by the same protocol;
- checkpoints compare only when metrics.json scored them on the same set by the same protocol;
  otherwise ``--eval-data DIR`` re-scores every candidate, at its resolution, on that one folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..model.checkpoint import quality_dataset, quality_metric, quality_source
from .workshop import Workshop, load_images

log = logging.getLogger(__name__)

NATIVE = 0  # in a --resolutions list: the checkpoint's own img_size


def parse_resolutions(text: str | None) -> list[int] | None:
    """``--resolutions 224,192,native`` as sizes in px (``native``: :data:`NATIVE`).

    Raises:
        InputError: a value that is not a positive whole number of pixels or ``native``.
    """
    if text is None:
        return None
    out = []
    for token in (t.strip() for t in text.split(",")):
        if token == "native":
            out.append(NATIVE)
        elif token.isdigit() and int(token) > 0:
            out.append(int(token))
        else:
            raise InputError(f"--resolutions: {token!r} is not a size in px (a whole number > 0, or native)")
    return out


def checkpoint_dirs(paths: list[Path]) -> list[Path]:
    """Each ``--checkpoint``: a checkpoint, or a folder whose sub-folders that are checkpoints
    (``config.json`` and ``weights.safetensors``) are taken in name order.

    Raises:
        InputError: a folder that is no checkpoint and holds none.
    """
    from ..model.checkpoint import CONFIG, WEIGHTS

    out = []
    for path in map(Path, paths):
        if not path.is_dir() or (path / CONFIG).exists() or (path / WEIGHTS).exists():
            out.append(path)  # a checkpoint, or not there: load_checkpoint says what is wrong
            continue
        runs = sorted(p for p in path.iterdir() if (p / CONFIG).is_file() and (p / WEIGHTS).is_file())
        if not runs:
            raise InputError(f"--checkpoint {path}: holds no checkpoint (neither it nor any sub-folder has "
                             f"{CONFIG} and {WEIGHTS})")
        out += runs
    return out


def _names(paths: list[Path]) -> list[str]:
    """How tables name each checkpoint: its folder's name, with its parent's where two share one."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


@dataclass
class Sources:
    """The run's checkpoints, the resolutions each profile asks for, and their workshops.

    Attributes:
        ckpts: the loaded checkpoints; ``names`` how tables name them ("" for a run of one).
        resolutions: ``--resolutions`` (None: each profile's ``resolutions``, else the checkpoint's own).
        eval_data: ``--eval-data``: where quality is re-scored when the run needs it.
        rescore: whether every candidate's quality is measured on ``eval_data``.
    """

    ckpts: list[Any]
    names: list[str]
    data: Path | None
    work: Path
    resolutions: list[int] | None = None
    eval_data: Path | None = None
    rescore: bool = False
    planned: tuple = ()  # every (checkpoint index, resolution) some profile of the run asks for
    _shops: dict = field(default_factory=dict)
    _images: dict = field(default_factory=dict)

    def sizes(self, profile, i: int) -> list[int]:
        """The resolutions of checkpoint ``i`` for ``profile``, in px, first listed first."""
        native = int(self.ckpts[i].config["img_size"])
        asked = self.resolutions if self.resolutions is not None else profile.resolutions or [NATIVE]
        return list(dict.fromkeys(native if r == NATIVE else r for r in asked))

    def labelled(self, profiles) -> tuple[bool, bool]:
        """Whether tables name each candidate's checkpoint, and its resolution: where the run has
        more than one checkpoint, or any size but the checkpoint's own."""
        other = any(s != c.config["img_size"] for p in profiles for i, c in enumerate(self.ckpts)
                    for s in self.sizes(p, i))
        return len(self.ckpts) > 1, other

    def images(self, i: int, resolution: int):
        """The check images of checkpoint ``i`` at ``resolution``, read once per run.

        Raises:
            InputError: a bad ``--data`` folder.
        """
        if (i, resolution) not in self._images:
            self._images[(i, resolution)] = load_images(self.data, {**self.ckpts[i].config, "img_size": resolution})
        return self._images[(i, resolution)]

    def workshops(self, profile) -> list[Workshop]:
        """One workshop per (checkpoint, resolution) of ``profile``, each made once per run."""
        return [self.workshop(i, r) for i in range(len(self.ckpts)) for r in self.sizes(profile, i)]

    def workshop(self, i: int, resolution: int) -> Workshop:
        key = (i, resolution)
        if key not in self._shops:
            from ..model.quality import eval_folder, measure_quality

            ckpt = self.ckpts[i]
            native = resolution == ckpt.config["img_size"]
            measured = None
            if self.rescore:
                measured = measure_quality(ckpt, resolution, Path(self.eval_data))
            elif not native or quality_metric(ckpt.metrics) is None and self._other_sizes(i):
                folder = eval_folder(ckpt, self.eval_data, f"quality at {resolution} px")
                measured = measure_quality(ckpt, resolution, folder)
                _check_same_set(ckpt, measured)
            work = self.work / f"{i}-{resolution}px"
            work.mkdir(parents=True, exist_ok=True)
            name = self.names[i] if len(self.ckpts) > 1 else ""
            self._shops[key] = Workshop(ckpt, self.images(i, resolution), work, resolution, name, measured)
        return self._shops[key]

    def _other_sizes(self, i: int) -> bool:
        return any(r != self.ckpts[i].config["img_size"] for (j, r) in self.planned if j == i)

    def quality(self, shops: list[Workshop]) -> tuple[str, str | None]:
        """The quality metric of ``shops``' candidates and the set and protocol that scored it."""
        measured = [s.measured for s in shops if s.measured is not None]
        if self.rescore and measured:
            ds = measured[0].dataset
            return measured[0].metric, (f"{ds['name']} ({ds['size']} images; {ds['protocol']}), measured at each "
                                        "candidate's resolution (--eval-data)")
        metrics = shops[0].ckpt.metrics
        metric = quality_metric(metrics) or (measured[0].metric if measured else None)
        source = quality_source(metrics)
        if measured and source is None:
            ds = measured[0].dataset
            source = f"{ds['name']} ({ds['size']} images; {ds['protocol']})"
        if measured:
            source = f"{source}; other resolutions measured at their own on the same images"
        return metric or "knn_top1", source


def _check_same_set(ckpt, measured) -> None:
    """Raises InputError where the images found now are not the set that scored metrics.json."""
    recorded = quality_dataset(ckpt.metrics, ckpt.exits[-1])
    if recorded is None:
        return
    keys = ("name", "size", "protocol")
    if tuple(recorded.get(k) for k in keys) != tuple(measured.dataset.get(k) for k in keys):
        raise InputError(f"{ckpt.path}: quality at {measured.resolution} px was measured on "
                         f"{_describe(measured.dataset)}, but metrics.json was scored on {_describe(recorded)}; "
                         "pass --eval-data DIR to score every candidate on one set")


def _describe(ds: dict | None) -> str:
    if not ds:
        return "no named set"
    return f"{ds.get('name', '?')} ({ds.get('size', '?')} images; {ds.get('protocol', 'protocol not given')})"


def open_sources(checkpoints: list[Path], profiles: list, data: Path | None, work: Path,
                 resolutions: list[int] | None = None, eval_data: Path | None = None) -> Sources:
    """Loads the checkpoints and checks every resolution and that their quality compares, before any
    work.

    Raises:
        InputError: a folder with no checkpoint, a bad checkpoint, a resolution that is not a multiple
            of a checkpoint's patch size (naming ``--resolutions`` or the profile's field), or two
            checkpoints scored on different sets with no ``--eval-data``.
    """
    from ..model.backbone import check_resolution
    from ..model.checkpoint import load_checkpoint

    paths = checkpoint_dirs(checkpoints)
    ckpts = [load_checkpoint(p) for p in paths]
    sources = Sources(ckpts, _names(paths), data, work, resolutions, eval_data)
    planned = set()
    for profile in profiles:
        where = "--resolutions" if resolutions is not None else f"{profile.path or profile.name}: resolutions"
        for i, ckpt in enumerate(ckpts):
            for r in sources.sizes(profile, i):
                check_resolution(ckpt.config, r, where)
                planned.add((i, r))
    sources.planned = tuple(sorted(planned))
    sets = {}
    for name, ckpt in zip(sources.names, ckpts):
        sets.setdefault((quality_metric(ckpt.metrics), quality_source(ckpt.metrics)), name)
    if len(sets) > 1:
        if eval_data is None:
            (a_set, a), (b_set, b) = list(sets.items())[:2]
            raise InputError(f"checkpoints {a} and {b} were scored on different sets ({a}: {a_set[1] or 'none'} "
                             f"[{a_set[0] or 'no quality'}]; {b}: {b_set[1] or 'none'} [{b_set[0] or 'no quality'}]), "
                             "so their quality does not compare; pass --eval-data DIR to re-score every candidate "
                             "on one labelled set")
        sources.rescore = True
    elif eval_data is not None and any(r != ckpts[i].config["img_size"] for i, r in planned):
        sources.rescore = True  # every candidate on the one folder given, its own resolution included
    return sources
