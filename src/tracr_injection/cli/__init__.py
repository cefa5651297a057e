"""Command-line interface: `tracr-inject`.

In: nothing.  Out: `app`, the Typer application that `tracr-inject` runs (defined in `cli.main`).
"""

from tracr_injection.cli.main import app

__all__ = ["app"]
