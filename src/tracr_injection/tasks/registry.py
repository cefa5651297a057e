"""Registry of tasks by name (the paper's three plus the extra `reverse` task).

In: a task name.  Out: its `Task` (`get_task`; the built-in tasks register on first lookup);
`task_names` lists the names and `register_task` adds a task.
"""

from __future__ import annotations

from tracr_injection.registry import Registry
from tracr_injection.tasks.base import Task


def _load_builtin_tasks() -> None:
    """Import the modules that register the built-in tasks."""
    from tracr_injection.tasks import count, dyck, reverse, sum  # noqa: F401


_TASKS: Registry[Task] = Registry("task", _load_builtin_tasks)
register_task = _TASKS.register
get_task = _TASKS.get
task_names = _TASKS.names
