"""When parameters are stepped: each stage as soon as its gradients are final, or all after the backward.

BIM stops gradients between stages, so once a stage's backward of a step's last micro-batch ends,
that stage's gradients are final. With ``update: stage`` its AdamW step runs right then and its
gradients are freed: one stage's gradients are alive at a time instead of the whole model's, and the
result is the one ``update: step`` gives (AdamW works parameter by parameter). Under torchrun each
stage's gradients are all-reduced as soon as its backward ends, without waiting; the wait comes just
before that stage is stepped, after the next stage's compute, so the communication hides behind it.

With ``overlap`` (interlocking backward) the loss of stage k also trains the last ``overlap`` blocks
of stage k - 1, so stage k - 1's gradients are final only after stage k's backward: the model reports
a stage's end one stage later (``on_stage_end``), and stage-local stepping follows it, one more
stage's gradients alive at a time. A stage-parallel layout, where stage k - 1 runs in another
process, would have to send the gradient of stage k's input (the tail's output) back one hop and
wait for it before stepping stage k - 1; it refuses overlap instead (see ``config``).

Per-stage steps would differ from one step of the whole model where a step needs every stage's
gradients first (clipping by the global norm) or where no stage's gradients are final before the
end (``e2e`` mode, one backward through every stage); there the run uses ``update: step`` and says
why. Gradient accumulation is exact: the stages are stepped during the last micro-batch.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .distributed import DistInfo, GradientReducer
from .optim import StageOptimizer


def resolve_update(cfg: TrainConfig) -> tuple[str, str]:
    """The update this run uses (``stage`` or ``step``) and a line saying which, and why where it is
    not the one asked for."""
    if cfg.update == "step":
        return "step", "update: step"
    why = None
    if cfg.bim.mode == "e2e":
        why = "mode e2e back-propagates through every stage at once"
    elif cfg.grad_clip is not None and cfg.grad_clip_mode == "global":
        why = ("grad_clip by the global norm needs every stage's gradients first; "
               "grad_clip_mode: stage clips each stage by its own norm")
    if why:
        return "step", f"update: step (update: stage would not give the same result: {why})"
    when = (f" during the last of {cfg.accum_steps} micro-batches" if cfg.accum_steps > 1 else "")
    return "stage", f"update: stage (each stage stepped as soon as its backward ends{when})"


class Stepper:
    """Applies one optimizer step, stage by stage or all at once, with the gradient all-reduce.

    Per step: :meth:`begin` with the step's learning rate; :meth:`stage_done` for each stage once its
    gradients of the step are all in (the model's ``on_stage_end`` on the last micro-batch);
    :meth:`finish` after the last stage.

    Args:
        optimizer: the per-stage AdamW.
        info: this process's place in the run (all-reduce under torchrun).
        update: ``stage`` or ``step`` (see :func:`resolve_update`).
        grad_clip: max gradient norm (None: no clipping).
        grad_clip_mode: ``global`` (over all parameters; only with ``update: step``) or ``stage``.
    """

    def __init__(self, optimizer: StageOptimizer, info: DistInfo, update: str, grad_clip: float | None = None,
                 grad_clip_mode: str = "global"):
        if update == "stage" and grad_clip is not None and grad_clip_mode == "global":
            raise ValueError("clipping by the global norm needs update: step")
        self.optimizer, self.update = optimizer, update
        self.grad_clip, self.grad_clip_mode = grad_clip, grad_clip_mode
        self.reducer = GradientReducer(info)
        self._final: list[int] = []  # stages whose gradients are final, not yet stepped

    def begin(self, lr: float) -> None:
        self.optimizer.set_lr(lr)
        self._final = []

    def stage_done(self, stage: int) -> None:
        """Stage ``stage``'s gradients of this step are complete: reduce them, and step it when due."""
        self.reducer.launch(stage, self.optimizer.params(stage))
        self._final.append(stage)
        if self.update == "stage":
            # under torchrun the newest stage's all-reduce runs on while the next stage computes
            keep = 1 if self.reducer.info.enabled else 0
            while len(self._final) > keep:
                self._apply(self._final.pop(0))

    def finish(self) -> None:
        """Steps what is left: the last stage (``stage``), or every stage (``step``)."""
        if self.update == "stage":
            while self._final:
                self._apply(self._final.pop(0))
            return
        if sorted(self._final) != sorted(self.optimizer.stages):
            raise RuntimeError(f"stages {self._final} reported done; every stage must be, once per step")
        for stage in self._final:
            self.reducer.wait(stage)
        if self.grad_clip is not None and self.grad_clip_mode == "global":
            torch.nn.utils.clip_grad_norm_(self.optimizer.params(), self.grad_clip)
        for stage in self.optimizer.stages:
            self._clip_and_step(stage)
        self._final = []

    def _apply(self, stage: int) -> None:
        self.reducer.wait(stage)
        self._clip_and_step(stage)

    def _clip_and_step(self, stage: int) -> None:
        if self.grad_clip is not None and self.grad_clip_mode == "stage":
            self.optimizer.clip_stage(stage, self.grad_clip)
        self.optimizer.step_stage(stage)
