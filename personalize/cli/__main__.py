"""``python -m personalize.cli``: the same command line as the ``personalize`` entry point."""

from __future__ import annotations

from personalize.cli.root import main

if __name__ == "__main__":  # pragma: no cover
    main()
