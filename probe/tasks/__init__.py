"""Evaluation tasks: one module per task behind the :class:`~probe.tasks.base.Task` interface.

>>> from probe.tasks import TargetInfo, create_task
>>> task = create_task("semseg", TargetInfo(num_classes=21))
"""

from probe.tasks.base import (
    IMPLIED_TARGET_KINDS,
    TargetInfo,
    Task,
    TrainingTargets,
    create_task,
    get_task,
    register_task,
    target_kind,
    task_names,
    task_target_kinds,
    tasks_for_targets,
)

__all__ = [
    "IMPLIED_TARGET_KINDS",
    "TargetInfo",
    "Task",
    "TrainingTargets",
    "create_task",
    "get_task",
    "register_task",
    "target_kind",
    "task_names",
    "task_target_kinds",
    "tasks_for_targets",
]
