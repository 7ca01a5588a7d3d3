"""``personalize vllm``: the model folder a vLLM server loads, and the command line that starts it for the vllm
serving backend (``PERSONALIZE_DECODER=vllm``). vLLM lives in its own venv (README: 'The vllm backend')."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from personalize.cli.common import clear_errors
from personalize.errors import InvalidInputError
from personalize.settings import Settings

vllm_app = typer.Typer(
    help="The vllm serving backend: export the model for a vLLM server and start it (vLLM in its own venv).",
    no_args_is_help=True,
)


@vllm_app.command("export-model")
@clear_errors
def export(
    out_dir: Path = typer.Argument(..., help="The folder to write (created; files hard-linked to the cache)"),
) -> None:
    """Write the configured model (the bundled SmolLM2: dequantised, fp32) as a Hugging Face folder vLLM loads."""
    from personalize.serving.vllm_backend import export_model

    typer.echo(str(export_model(Settings(), out_dir)))


def _command(model_dir: Path, python: str | None) -> tuple[list[str], dict[str, str]]:
    from personalize.serving.vllm_backend import VLLM_PYTHON_ENV, server_command, vllm_python

    settings = Settings().vllm
    exe = python or vllm_python(settings)
    if not exe:
        raise InvalidInputError(
            f"no python with vLLM: pass --python, set {VLLM_PYTHON_ENV} or PERSONALIZE_VLLM__PYTHON (README: 'The "
            "vllm backend' installs it in its own venv)",
            "python",
        )
    return server_command(exe, model_dir, settings)


@vllm_app.command("command")
@clear_errors
def command(
    model_dir: Path = typer.Argument(..., help="The model folder (personalize vllm export-model DIR)"),
    python: str | None = typer.Option(None, help="The python of vLLM's venv (default PERSONALIZE_VLLM__PYTHON)"),
) -> None:
    """Print the command line that starts a vLLM server for the backend (host, port and limits from settings)."""
    argv, env = _command(model_dir, python)
    typer.echo(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)]))


@vllm_app.command("start")
@clear_errors
def start(
    model_dir: Path = typer.Argument(..., help="The model folder (personalize vllm export-model DIR)"),
    python: str | None = typer.Option(None, help="The python of vLLM's venv (default PERSONALIZE_VLLM__PYTHON)"),
) -> None:
    """Run the vLLM server in the foreground (this process becomes it; Ctrl-C stops it)."""
    argv, env = _command(model_dir, python)
    os.execve(argv[0], argv, {**os.environ, **env})


__all__ = ["vllm_app"]
