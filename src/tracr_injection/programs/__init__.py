"""Programs stage: the RASP programs this project compiles, by name.

In: nothing.  Out: nothing re-exported; `programs.registry` holds `ProgramSpec` and `get_program`
(which loads the built-in programs of `paper_registry`, `reverse` and `tracr_library` on first use), and
`programs.paper` / `programs.reverse` build the causal task programs with their reference evaluators.
"""
