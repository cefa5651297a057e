"""The errors every stage shares: the package's root error and a damaged artifact on disk.

In: nothing (this module imports no stage, so every stage may import it).  Out: `TracrInjectionError`,
the base of every error the package raises on purpose (the CLI prints it as one line, no traceback),
`InvalidArgumentError`, an argument value a caller gave that is unknown or out of range, and
`ArtifactError`, a file written earlier (teacher, targets, checkpoint, run folder) that is
missing, corrupt or from an incompatible version.  Stage-specific errors subclass these in their stage.
"""


class TracrInjectionError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidArgumentError(TracrInjectionError, ValueError):
    """An argument value a caller gave is unknown or out of range (a ValueError, so library callers may catch
    either; the CLI prints it as one line, while a ValueError raised by a bug keeps its traceback)."""


class ArtifactError(TracrInjectionError, OSError):
    """A file written earlier (teacher, targets, checkpoint, run folder) is missing, corrupt or from an
    incompatible version."""
