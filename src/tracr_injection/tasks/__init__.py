"""Tasks stage: the paper's tasks (and more) as data splits, prompts and a token bridge to the teacher.

In: a task name and a tokenizer.  Out: the `Task` (`get_task`) with its seeded splits of `Example`s,
the `TokenBridge` that turns examples into LM tokens with teacher inputs and answer labels, and the
JSONL export and import of splits.

Flow: `Task` (registered program + seeded splits of `Example`s) -> `TokenBridge` (LM tokens,
one teacher symbol per token, answer labels) -> `targets` (the teacher's residual streams,
computed once and stored on disk for training).
"""

from tracr_injection.tasks.base import Example, Segment, SplitSpec, Task, export_jsonl, read_jsonl
from tracr_injection.tasks.bridge import (
    IGNORE_INDEX,
    BridgedExample,
    SymbolTokenizationError,
    TeacherCannotRepresentError,
    TokenBridge,
    teacher_blocker,
    teacher_inputs,
)
from tracr_injection.tasks.registry import get_task, register_task, task_names

__all__ = [
    "IGNORE_INDEX",
    "BridgedExample",
    "Example",
    "Segment",
    "SplitSpec",
    "SymbolTokenizationError",
    "Task",
    "TeacherCannotRepresentError",
    "TokenBridge",
    "export_jsonl",
    "get_task",
    "read_jsonl",
    "register_task",
    "task_names",
    "teacher_blocker",
    "teacher_inputs",
]
