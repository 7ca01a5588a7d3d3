"""The ``personalize`` command line: a thin shell over ``Personalizer``, one module per sub-app.

``app`` (the console entry point ``personalize = "personalize.cli:app"``) is built in ``personalize.cli.root``;
the helpers every command shares live in ``personalize.cli.common``.
"""

from __future__ import annotations

from personalize.cli.root import app, main

__all__ = ["app", "main"]
