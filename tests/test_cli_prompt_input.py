"""`generate` and `retrieve` read the prompt from a file (--prompt-file) or stdin ('-'), since a long prompt cannot
be passed as one shell argument (issue 18, class 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from personalize.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cli(home, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PERSONALIZE_AUTO_TRAIN", "false")
    runner = CliRunner()

    def invoke(*args: str, stdin: bytes | None = None):
        return runner.invoke(app, list(args), input=stdin, catch_exceptions=False)

    path = tmp_path / "items.jsonl"
    rows = [
        {"user_id": "a", "id": "1", "text": "tomatoes need sun and water"},
        {"user_id": "a", "id": "2", "text": "a space opera with robots"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert invoke("users", "import", str(path)).exit_code == 0
    return invoke


def _answer(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_prompt_from_a_file_or_stdin_is_the_same_prompt(cli, tmp_path):
    prompt = "Which vegetable\\ needs sun? 'quotes' and \"double quotes\" and $HOME stay as written"
    path = tmp_path / "prompt.txt"
    path.write_text(prompt + "\n")  # an editor's final newline is not part of the prompt
    common = ["--method", "rag", "--retriever", "bm25", "--max-new-tokens", "2", "--json"]
    from_arg = _answer(cli("generate", "a", prompt, *common))
    from_file = _answer(cli("generate", "a", "--prompt-file", str(path), *common))
    from_stdin = _answer(cli("generate", "a", "-", *common, stdin=(prompt + "\n").encode()))
    from_stdin_option = _answer(cli("generate", "a", "--prompt-file", "-", *common, stdin=prompt.encode()))
    assert from_arg["prompt"].endswith(prompt)
    assert from_file["prompt"] == from_stdin["prompt"] == from_stdin_option["prompt"] == from_arg["prompt"]
    assert from_file["retrieved"] == from_arg["retrieved"]


def test_a_prompt_too_long_for_a_shell_argument(cli, tmp_path):
    path = tmp_path / "long.txt"
    # 150,020 characters, over Linux's 128 KiB per argument; lower case, as the tiny model's tokenizer decodes it
    path.write_text("word " * 30_000 + "what should i plant?")
    result = _answer(
        cli("generate", "a", "--prompt-file", str(path), "--method", "none", "--max-new-tokens", "2", "--json")
    )
    assert result["truncated"] and result["prompt"].rstrip().endswith("what should i plant?")


def test_query_from_stdin_and_a_file(cli, tmp_path):
    out = cli("retrieve", "a", "-", "--retriever", "bm25", "--k", "1", stdin=b"tomatoes\n")
    assert out.exit_code == 0 and "[1] tomatoes" in out.output
    path = tmp_path / "query.txt"
    path.write_text("robots in space")
    out = cli("retrieve", "a", "--query-file", str(path), "--retriever", "bm25", "--k", "1")
    assert out.exit_code == 0 and "[2] a space opera" in out.output


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["generate", "a"], None, "give the prompt once"),
        (["generate", "a", "hi", "--prompt-file", "p.txt"], None, "not both"),
        (["generate", "a", "--prompt-file", "missing.txt"], None, "cannot read the prompt from missing.txt"),
        (["generate", "a", "--prompt-file", "."], None, "cannot read the prompt"),
        (["generate", "a", "-"], b"caf\xe9", "not UTF-8"),
        (["generate", "a", "-"], b"", "prompt is empty"),
        (["retrieve", "a", "-"], b"\n", "query is empty"),
        (["retrieve", "a"], None, "give the query once"),
    ],
)
def test_bad_prompt_input_is_one_line(cli, tmp_path, monkeypatch, args, stdin, needle):
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("hello")
    result = cli(*args, stdin=stdin)
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_a_huge_prompt_file_is_refused_without_reading_it(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_MAX_PROMPT_CHARS", "100")
    path = tmp_path / "huge.txt"
    path.write_bytes(b"x" * 10_000)
    result = cli("generate", "a", "--prompt-file", str(path))
    assert result.exit_code == 2 and "longer than 100 characters" in result.output


def test_a_real_shell_pipe(home, tiny_model_dir, cli):
    env = {**os.environ, "PERSONALIZE_HOME": str(home), "PERSONALIZE_MODEL": str(tiny_model_dir)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, "-m", "personalize.cli", "retrieve", "a", "-", "--retriever", "bm25", "--k", "1"]
    done = subprocess.run(command, input=b"sun for tomatoes\n", capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"[1] tomatoes" in done.stdout
