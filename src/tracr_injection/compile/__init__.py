"""Compile stage: RASP program -> tracr -> verified, cached PyTorch teacher.

In: a RASP program (or a registered `ProgramSpec`) with its vocabulary and maximum length.  Out: a
`TeacherModel` validated against the RASP evaluator and cached on disk.  This package file re-exports
nothing: import from its modules (`compile.compiler` for `compile_program`, `compile.teacher` for
`TeacherModel`).
"""
