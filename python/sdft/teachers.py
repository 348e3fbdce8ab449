"""Teacher policies: which model scores the student's rollouts, and how it follows the student.

- :class:`StaticTeacher` (``teacher.mode: static``): the frozen base model (the paper's default);
- :class:`SyncTeacher` (``sync``): a saved copy of the student, refreshed every ``sync_every``
  steps; its path goes into the checkpoint rows so a resumed run restores the same teacher;
- :class:`EmaTeacher` (``ema``, local backend): an exponential moving average of the student,
  updated by the backend after every ``optim_step``; the backend saves the average with the
  state checkpoint, so a resumed run continues it.

Each policy creates its sampling client, acts after each training step, and says what goes into
a checkpoint row.
"""

from __future__ import annotations

from typing import Any

from sdft.checkpoints import TEACHER_PATH_KEY, CheckpointRecord
from sdft.clients import resolve
from sdft.config import TeacherSection


class TeacherPolicy:
    """The frozen base model; subclasses follow the student."""

    def __init__(self, service: Any, model_name: str) -> None:
        self.service = service
        self.model_name = model_name
        self.client: Any = None

    async def create(self, training_client: Any, resume_from: CheckpointRecord | None) -> None:
        self.client = await resolve(self.service.create_sampling_client(base_model=self.model_name))

    async def after_step(self, step: int, training_client: Any) -> None:
        """Called once the student's weights of ``step`` are final."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Keys for the checkpoint row, enough to restore this teacher on resume."""
        return {}


class StaticTeacher(TeacherPolicy):
    pass


class SyncTeacher(TeacherPolicy):
    def __init__(self, service: Any, model_name: str, sync_every: int) -> None:
        super().__init__(service, model_name)
        self.sync_every = sync_every
        self.path: str | None = None

    async def create(self, training_client: Any, resume_from: CheckpointRecord | None) -> None:
        path = resume_from.extra.get(TEACHER_PATH_KEY) if resume_from is not None else None
        if path:
            self.path = path
            self.client = await resolve(self.service.create_sampling_client(model_path=path))
            return
        await super().create(training_client, resume_from)

    async def after_step(self, step: int, training_client: Any) -> None:
        """Hard sync: the teacher becomes a saved copy of the student's current weights."""
        if step % self.sync_every:
            return
        saved = await resolve(training_client.save_weights_for_sampler(f"teacher-{step:06d}"))
        self.path = saved.path
        self.client = await resolve(self.service.create_sampling_client(model_path=saved.path))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {TEACHER_PATH_KEY: self.path} if self.path else {}


class EmaTeacher(TeacherPolicy):
    def __init__(self, service: Any, model_name: str, alpha: float) -> None:
        super().__init__(service, model_name)
        self.alpha = alpha

    async def create(self, training_client: Any, resume_from: CheckpointRecord | None) -> None:
        self.client = await resolve(training_client.create_ema_sampling_client(alpha=self.alpha))


def teacher_policy(teacher: TeacherSection, service: Any, model_name: str) -> TeacherPolicy:
    """The policy ``algorithm.params.teacher`` selects."""
    if teacher.mode == "ema":
        return EmaTeacher(service, model_name, teacher.ema_alpha)
    if teacher.mode == "sync":
        if teacher.sync_every is None:
            raise ValueError("teacher.mode: sync needs teacher.sync_every")
        return SyncTeacher(service, model_name, teacher.sync_every)
    return StaticTeacher(service, model_name)
