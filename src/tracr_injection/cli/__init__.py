"""Command-line interface: `tracr-inject`."""

from tracr_injection.cli.main import app

__all__ = ["app"]
