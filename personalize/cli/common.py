"""What every command of the ``personalize`` command line shares: clear errors, the ``Personalizer``, JSON output.

Each sub-app module imports these instead of repeating them, so a library error reads the same one line (exit
status 2) whichever command raised it.
"""

from __future__ import annotations

import json
from functools import wraps
from typing import Any

import typer
from pydantic import ValidationError

from personalize.errors import PersonalizeError
from personalize.personalizer import Personalizer
from personalize.settings import Settings


def clear_errors(fn):  # noqa: ANN001, ANN201
    """Turn library errors into one readable line and exit status 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonalizeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except ValidationError as exc:  # a PERSONALIZE_* variable or .env entry that Settings refuses
            typer.echo(f"error: {setting_error(exc)}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def setting_error(exc: ValidationError) -> str:
    """The first refused setting as its environment variable, e.g. ``PERSONALIZE_K: Input should be ...``."""
    first = exc.errors()[0]
    name = "PERSONALIZE_" + "__".join(str(part).upper() for part in first.get("loc", ()))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"setting {name}: {first.get('msg', 'invalid')}{more}"


def client() -> Personalizer:
    """A ``Personalizer`` on the settings of the environment (``PERSONALIZE_*``, ``.env``)."""
    return Personalizer(Settings())


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))
