"""Registry of tasks by name (the paper's three plus the extra `reverse` task)."""

from __future__ import annotations

from tracr_injection.tasks.base import Task

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` (a name can be registered once)."""
    if task.name in _TASKS:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name`, or a KeyError listing the known names."""
    _load_builtin_tasks()
    if name not in _TASKS:
        raise KeyError(f"Unknown task {name!r}; registered: {', '.join(task_names())}")
    return _TASKS[name]


def task_names() -> list[str]:
    """Names of every registered task."""
    _load_builtin_tasks()
    return sorted(_TASKS)


def _load_builtin_tasks() -> None:
    """Import the modules that register the built-in tasks."""
    from tracr_injection.tasks import count, dyck, reverse, sum  # noqa: F401
