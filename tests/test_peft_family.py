"""The PEFT family per user (issue 15): IA3, prompt tuning, P-tuning and prefix tuning beside LoRA. Each method
trains, is stored with its method, serves as ``peft:<method>`` (answers equal to peft's own model on the same
weights), batches equal one-at-a-time answers, the fast decoder falls back saying why, forget removes every
method's adapter, and an adapter that changes nothing is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import movie_items, start_worker, stop_process, wait_for

from personalize import Personalizer, Settings
from personalize.adapters.cache import AdapterCache, greedy_by_forward
from personalize.adapters.peft_utils import private_base_copy
from personalize.data.naming import user_key
from personalize.errors import AdapterHasNoEffectError, InvalidInputError, UnknownAdapterMethodError
from personalize.methods import adapter_method_of, get_method, ordered, uses_adapter, without_adapter
from personalize.serving.backend import AdapterRef, DecodeRow
from personalize.serving.fast_backend import FastBackend
from personalize.serving.hf_backend import HFBackend, generate_text
from personalize.settings import IA3Settings, PrefixTuningSettings, PromptTuningSettings, PTuningSettings

PROMPT = "Which film should I watch tonight?"
SMALL = {"epochs": 1, "batch_size": 4, "max_length": 64}
FAMILY = {
    "ia3": ("IA3", False),
    "prompt-tuning": ("PROMPT_TUNING", True),
    "p-tuning": ("P_TUNING", True),
    "prefix-tuning": ("PREFIX_TUNING", True),
}


def _rated(n: int, prefix: str = "") -> list[dict]:
    return [{**item, "output": str(1 + i % 5)} for i, item in enumerate(movie_items(n, prefix))]


@pytest.fixture
def family(settings: Settings) -> Settings:
    """Small budgets for every method, as the suite's LoRA has (virtual tokens kept few for the tiny model)."""
    return settings.model_copy(
        update={
            "ia3": IA3Settings(**SMALL),
            "prompt_tuning": PromptTuningSettings(num_virtual_tokens=4, **SMALL),
            "p_tuning": PTuningSettings(num_virtual_tokens=4, encoder_hidden_size=32, **SMALL),
            "prefix_tuning": PrefixTuningSettings(num_virtual_tokens=4, **SMALL),
        }
    )


def _reference_answer(client: Personalizer, adapter_path: str, prompt_ids: list[int], prompt_learning: bool) -> str:
    """What peft itself answers with the same adapter on a fresh copy of the base."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(private_base_copy(client.model.model), adapter_path).eval()
    if prompt_learning:
        return greedy_by_forward(client.model, model, prompt_ids, 4)[0]
    return generate_text(client.model, prompt_ids, 4, model=model).text


def test_method_names_carry_the_adapter_method():
    assert adapter_method_of("peft") == "lora" and adapter_method_of("rag+peft:ia3") == "ia3"
    variant = get_method("rag+peft:prompt-tuning")
    assert variant is not None and variant.uses_retrieval and variant.uses_adapter and variant.cost_rank == 3
    assert without_adapter("peft:ia3") == "none" and without_adapter("rag+peft:ia3") == "rag"
    assert get_method("peft:ia3").colour != get_method("peft").colour
    assert get_method("none:ia3") is None and get_method("peft:") is None and not uses_adapter("rag:ia3")
    assert ordered(["rag+peft:ia3", "majority", "peft:ia3", "none", "peft", "rag+peft"]) == [
        "none",
        "peft",
        "peft:ia3",
        "rag+peft",
        "rag+peft:ia3",
        "majority",
    ]


@pytest.mark.parametrize("method", list(FAMILY))
def test_each_method_trains_saves_serves_and_is_its_own(family, method):
    peft_type, prompt_learning = FAMILY[method]
    with Personalizer(family) as client:
        client.add_items("alice", _rated(10))
        adapter = client.train("alice", method=method)
        assert adapter.method == method and adapter.version == 1
        assert client.current_adapter("alice") is None  # plain peft is LoRA: alice has none
        assert client.current_adapter("alice", method) == adapter
        folder = Path(adapter.path)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == peft_type
        metadata = json.loads((folder / "personalize.json").read_text())
        assert metadata["method"] == method and metadata["trainer"] == "plain"
        assert adapter.config is not None and adapter.config["peft_type"] == peft_type

        result = client.generate("alice", PROMPT, method=f"peft:{method}", max_new_tokens=4)
        assert result.method == f"peft:{method}" and result.retrieved == []
        extra = result.timings.extra
        assert extra["adapter_method"] == method and extra["adapter_version"] == 1
        # the fast decoder (the suite's default) serves every method of the family: virtual tokens in its cache,
        # IA3's scales in its steps
        assert extra["decoder"].startswith("fast-") and "decoder_note" not in extra
        prompt_ids = client.prepare("alice", PROMPT, method=f"peft:{method}").built.input_ids
        assert result.text == _reference_answer(client, adapter.path, list(prompt_ids), prompt_learning)
        assert client.generate("alice", PROMPT, method="peft", max_new_tokens=2).method == "none"  # no LoRA yet
        both = client.generate("alice", PROMPT, method=f"rag+peft:{method}", max_new_tokens=2)
        assert both.method == f"rag+peft:{method}" and len(both.retrieved) == 4
        scored = client.score_labels("alice", PROMPT, ["1", "2", "3"], f"peft:{method}")
        assert scored.method == f"peft:{method}" and set(scored.timings.extra["label_log_likelihoods"]) == {
            "1",
            "2",
            "3",
        }


@pytest.mark.parametrize("method", list(FAMILY))
def test_a_batch_equals_one_at_a_time_answers(family, method):
    with Personalizer(family.model_copy(update={"decoder": "plain"})) as client:
        for user in ("alice", "bob", "carol"):
            client.add_items(user, _rated(9, prefix=user))
        for user in ("alice", "bob"):
            client.train(user, method=method)
        requests = [("alice", PROMPT), ("bob", PROMPT), ("carol", PROMPT), ("alice", "Another evening, a film?")]
        batch = client.generate_batch(requests, method=f"peft:{method}", max_new_tokens=4)
        alone = [client.generate(u, q, method=f"peft:{method}", max_new_tokens=4) for u, q in requests]
        assert [r.text for r in batch] == [r.text for r in alone]
        assert [r.method for r in batch] == [f"peft:{method}", f"peft:{method}", "none", f"peft:{method}"]
        want = "one-at-a-time" if FAMILY[method][1] else "grouped"
        assert {r.timings.extra["adapter_batching"] for r in batch} == {want}
        cache = client.serving.plain.cache_for(client.model, FAMILY[method][0])
        assert cache.evict_user(user_key("alice")) == 1  # one of two unloaded; a non-LoRA name carries its method
        assert cache.names() == [f"{user_key('bob')}_{method}"]
        assert client.generate("bob", PROMPT, method=f"peft:{method}", max_new_tokens=4).text == alone[1].text


def test_auto_serves_the_adapter_method_a_calibrated_band_names(family):
    from personalize.serving.router import Band, Policy

    with Personalizer(family) as client:
        client.add_items("alice", _rated(10))
        client.add_items("bob", _rated(10, prefix="bob"))
        lora = client.train("alice")
        ia3 = client.train("alice", method="ia3")
        client.train("bob")  # bob has LoRA only
        client.router.save(Policy("generic", [Band(1, "peft:ia3")]))
        alice = client.generate("alice", PROMPT, method="auto", max_new_tokens=4)
        assert alice.method == "peft:ia3" and alice.timings.extra["adapter_method"] == "ia3"
        assert alice.timings.extra["adapter_version"] == ia3.version != lora.version  # versions count per user
        assert alice.text == client.generate("alice", PROMPT, method="peft:ia3", max_new_tokens=4).text
        bob = client.generate("bob", PROMPT, method="auto", max_new_tokens=4)  # no IA3 adapter: none, not his LoRA
        assert bob.method == "none" and any("peft:ia3 needs an adapter" in n for n in bob.notes)


def test_rows_of_several_methods_run_each_methods_rows_apart(family):
    with Personalizer(family.model_copy(update={"decoder": "plain"})) as client:
        client.add_items("alice", _rated(9))
        lora, ia3 = client.train("alice"), client.train("alice", method="ia3")
        key = user_key("alice")
        rows = [
            DecodeRow(client.prepare("alice", PROMPT, method=m).built.input_ids, AdapterRef.of(key, a))
            for m, a in (("peft", lora), ("peft:ia3", ia3))
        ]
        backend = HFBackend()
        facts: dict = {}
        together = backend.generate(client.model, rows + [DecodeRow(rows[0].prompt_ids)], 4, facts)
        apart = [backend.generate(client.model, [row], 4, {}) for row in rows]
        assert [g.text for g in together[:2]] == [a[0].text for a in apart]
        assert together[2] == generate_text(client.model, rows[0].prompt_ids, 4)
        assert facts["adapter_batching"] == "by method: LORA mixed, IA3 single"


def _untrained_adapter(client: Personalizer, config, folder: Path) -> Path:
    """A peft adapter exactly as peft initialises it (LoRA's B = 0, IA3's scales = 1): it changes nothing."""
    from peft import get_peft_model

    from personalize.adapters.format import ADAPTER_METADATA, METADATA_FORMAT

    get_peft_model(private_base_copy(client.model.model), config).save_pretrained(str(folder))
    metadata = {"format": METADATA_FORMAT, "base_model": client.model.name, "owner": "x"}
    (folder / ADAPTER_METADATA).write_text(json.dumps(metadata))
    return folder


def test_an_adapter_that_changes_nothing_is_refused_and_not_kept(client, tmp_path):
    from peft import IA3Config, LoraConfig

    configs = {
        "lora": LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "ia3": IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        ),
    }
    for name, config in configs.items():
        folder = _untrained_adapter(client, config, tmp_path / name)
        cache = AdapterCache(client.model)
        with pytest.raises(AdapterHasNoEffectError, match=rf"adapter '{name}' at .* does not change the model"):
            cache.ensure_loaded(name, folder)
        assert cache.names() == [] and cache.model is cache._base  # unloaded again: the base is as it was
        unchecked = AdapterCache(client.model, probe=False)
        assert unchecked.ensure_loaded(name, folder) is False and unchecked.names() == [name]
    # a trained adapter passes the probe, with another one loaded before it
    client.add_items("alice", _rated(9))
    trained = Path(client.train("alice").path)
    cache = AdapterCache(client.model)
    cache.ensure_loaded("first", trained)
    cache.activate("first", trained)
    cache.ensure_loaded("second", trained)
    assert cache.names() == ["first", "second"] and cache._peft.active_adapter == "first"  # the probe restores it


def test_forget_removes_every_methods_adapter(family):
    with Personalizer(family.model_copy(update={"decoder": "plain"})) as client:
        client.add_items("alice", _rated(9))
        folders = [Path(client.train("alice", method=m).path) for m in ("lora", "ia3", "prompt-tuning")]
        for method in ("peft", "peft:ia3", "peft:prompt-tuning"):
            client.generate("alice", PROMPT, method=method, max_new_tokens=2)
        backend = client.serving.plain
        loaded_before = {t: backend.cache_for(client.model, t).names() for t in ("LORA", "IA3", "PROMPT_TUNING")}
        key = user_key("alice")
        assert loaded_before == {"LORA": [key], "IA3": [f"{key}_ia3"], "PROMPT_TUNING": [f"{key}_prompt-tuning"]}
        report = client.forget("alice")
        assert report.adapters == 3 and not any(f.exists() for f in folders)
        assert all(backend.cache_for(client.model, t).names() == [] for t in loaded_before)
        client.add_items("alice", _rated(9))
        assert client.current_adapter("alice", "ia3") is None and client.adapters("alice") == []


def test_unknown_adapter_methods_are_refused_clearly(client):
    client.add_items("alice", _rated(9))
    with pytest.raises(UnknownAdapterMethodError, match="unknown adapter method 'nope'.*lora, ia3, prompt-tuning"):
        client.generate("alice", PROMPT, method="peft:nope")
    with pytest.raises(InvalidInputError, match=r"unknown method 'peft:'.*peft:<adapter method>"):
        client.generate("alice", PROMPT, method="peft:")
    with pytest.raises(UnknownAdapterMethodError):
        client.train("alice", method="nope")
    with pytest.raises(UnknownAdapterMethodError):
        client.enqueue_training("alice", method="LoRA")
    assert client.training_jobs("alice") == []  # nothing was queued for a bad name


@pytest.mark.slow
def test_a_real_worker_trains_a_non_lora_method(settings, tmp_path):
    """The job records its method, the worker trains it with that method's settings, and it serves."""
    env = {
        **os.environ,
        "PERSONALIZE_HOME": str(settings.home),
        "PERSONALIZE_MODEL": settings.model,
        "PERSONALIZE_PROMPT_TUNING__EPOCHS": "1",
        "PERSONALIZE_PROMPT_TUNING__BATCH_SIZE": "4",
        "PERSONALIZE_PROMPT_TUNING__MAX_LENGTH": "64",
        "PERSONALIZE_PROMPT_TUNING__NUM_VIRTUAL_TOKENS": "4",
        "PERSONALIZE_TORCH_THREADS": "1",
    }
    log = tmp_path / "worker.log"
    with Personalizer(settings.model_copy(update={"decoder": "plain"})) as client:
        client.add_items("w1", _rated(8, prefix="w1"))
        queued = client.enqueue_training("w1", method="prompt-tuning")
        assert queued.queued and client.training_jobs("w1")[0].method == "prompt-tuning"
        assert not client.enqueue_training("w1", method="prompt-tuning").queued  # one active job per method
        worker = start_worker(env, log)
        try:
            wait_for(lambda: client.current_adapter("w1", "prompt-tuning"), 240, "a prompt-tuning adapter", log)
        finally:
            stop_process(worker)
        adapter = client.current_adapter("w1", "prompt-tuning")
        assert adapter is not None and adapter.config["num_virtual_tokens"] == 4
        assert client.current_adapter("w1") is None  # no LoRA adapter was trained
        result = client.generate("w1", PROMPT, method="peft:prompt-tuning", max_new_tokens=3)
        assert result.method == "peft:prompt-tuning" and result.timings.extra["adapter_batching"] == "single"


@pytest.mark.slow
def test_an_eval_run_compares_adapter_methods_trained_by_a_worker(home, tiny_model_dir, monkeypatch):
    """``eval run --peft-methods ia3``: peft:ia3 and rag+peft:ia3 beside peft, each user's IA3 adapter trained by a
    real worker with the run's IA3 settings, reported with intervals like every method."""
    from typer.testing import CliRunner

    from personalize.cli import app
    from personalize.data.schema import EvalResult
    from personalize.eval.reports import build_report
    from personalize.eval.runner import EvaluationRunner

    for key, value in {
        "PERSONALIZE_HOME": str(home),
        "PERSONALIZE_MODEL": str(tiny_model_dir),
        "PERSONALIZE_LORA__EPOCHS": "1",
        "PERSONALIZE_LORA__MAX_LENGTH": "64",
        "PERSONALIZE_IA3__EPOCHS": "1",
        "PERSONALIZE_IA3__MAX_LENGTH": "64",
        "PERSONALIZE_IA3__LEARNING_RATE": "0.02",
    }.items():
        monkeypatch.setenv(key, value)
    args = ["eval", "run", "--task", "movielens-rating", "--synthetic", "3", "--methods", "none,peft"]
    args += ["--peft-methods", "ia3", "--train-via", "workers", "--workers", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1].split()[-1]
    with Personalizer() as client:
        report = build_report(client.store, run_id)
        assert [r.method for r in report.table] == ["none", "peft", "peft:ia3", "rag+peft:ia3"]
        ia3 = next(r for r in report.table if r.method == "peft:ia3")
        assert ia3.n_queries == report.table[0].n_queries and ia3.intervals["mae"] is not None
        assert "mae" in ia3.vs_none  # a paired comparison with none, like every method
        training = report.cost["training"]
        assert training["adapters"] == 6  # 3 users x (LoRA, IA3), each method's cost apart
        assert {m: c["adapters"] for m, c in training["by_method"].items()} == {"ia3": 3, "lora": 3}
        assert training["by_method"]["ia3"]["adapter_bytes_mean"] < training["by_method"]["lora"]["adapter_bytes_mean"]
        params = {m: c["trainable_params"] for m, c in training["by_method"].items()}
        assert 0 < params["ia3"] < params["lora"]  # recorded by each training run: IA3's scales are far fewer
        assert "training (ia3): 3 adapters" in result.stdout
        with client.store.session() as s:
            users = {r.user_external_id for r in s.query(EvalResult).filter(EvalResult.run_id == run_id)}
        for user in users:
            uid = f"eval/movielens-rating/test/{user}"
            adapter = client.current_adapter(uid, "ia3")
            assert adapter is not None and adapter.config["learning_rate"] == 0.02  # the worker got the run's settings
        assert EvaluationRunner(client).config_of(run_id).adapter_settings["ia3"]["epochs"] == 1


def test_rslora_trains_on_the_fast_step_and_serves_on_the_fast_decoder_as_peft_does(settings):
    """rsLoRA is plain LoRA with alpha / sqrt(r): both fast paths cover it, and answer as peft's own model does."""
    lora = settings.lora.model_copy(update={"rank": 4, "alpha": 8.0, "use_rslora": True})
    with Personalizer(settings.model_copy(update={"lora": lora, "decoder": "fast-fp32"})) as client:
        client.add_items("alice", _rated(10))
        adapter = client.train("alice")
        folder = Path(adapter.path)
        assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
        assert json.loads((folder / "personalize.json").read_text())["trainer"] == "fast"
        result = client.generate("alice", PROMPT, method="peft", max_new_tokens=4)
        assert result.timings.extra["decoder"] == "fast-fp32" and "decoder_note" not in result.timings.extra
        prompt_ids = client.prepare("alice", PROMPT, method="peft").built.input_ids
        assert result.text == _reference_answer(client, adapter.path, list(prompt_ids), False)


def test_dora_trains_and_serves_on_peft_s_own_paths_saying_why(settings):
    """DoRA is peft type LORA, but neither fast path nor vLLM runs it: peft's step trains it and peft's model answers,
    each with a note, and the vLLM backend keeps it local."""
    from personalize.serving.backends import backend_for
    from personalize.serving.modeling import LoadedModel

    lora = settings.lora.model_copy(update={"use_dora": True})
    with Personalizer(settings.model_copy(update={"lora": lora})) as client:  # asks for the fast step and decoder
        client.add_items("alice", _rated(10))
        adapter = client.train("alice")
        folder = Path(adapter.path)
        assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
        metadata = json.loads((folder / "personalize.json").read_text())
        assert metadata["trainer"] == "plain"
        assert adapter.config is not None and "DoRA" in (adapter.config.get("trainer_note") or "")
        result = client.generate("alice", PROMPT, method="peft", max_new_tokens=4)
        extra = result.timings.extra
        assert extra["decoder"] == "plain" and "DoRA adapters" in extra["decoder_note"]
        prompt_ids = client.prepare("alice", PROMPT, method="peft").built.input_ids
        assert result.text == _reference_answer(client, adapter.path, list(prompt_ids), False)
        client.add_items("bob", _rated(9, prefix="bob"))
        client.add_items("carol", _rated(9, prefix="carol"))
        client.train("bob")
        requests = [("alice", PROMPT), ("bob", PROMPT), ("carol", PROMPT), ("alice", "Another evening, a film?")]
        batch = client.generate_batch(requests, method="peft", max_new_tokens=4)
        alone = [client.generate(u, q, method="peft", max_new_tokens=4) for u, q in requests]
        assert [r.text for r in batch] == [r.text for r in alone]  # each DoRA adapter's rows in a pass of their own
        assert {r.timings.extra["adapter_batching"] for r in batch if r.method == "peft"} == {"grouped"}
        ref = AdapterRef.of(user_key("alice"), adapter)
        assert ref.dora and ref.peft_type == "LORA"
        vllm = backend_for(client.settings.model_copy(update={"decoder": "vllm"}), HFBackend())
        plain = LoadedModel(client.settings.model, None, None, False, 512, 0.0, "")
        assert "DoRA adapters" in (vllm.local_reason(plain, [DecodeRow([1, 2], ref)]) or "")  # type: ignore[attr-defined]


def test_the_fast_decoder_serves_virtual_tokens_and_ia3_as_peft_does_in_mixed_batches(family):
    """Prompt tuning, P-tuning, prefix tuning and IA3 on the fast decoder: the logits after a prompt equal peft's
    forward on the same adapter (fp32 weights, so nothing but summation order differs), greedy answers equal
    peft's (``greedy_by_forward`` / ``generate``), and one batch mixing the four methods, LoRA and the base
    (prompts of different lengths: left padding) equals each row alone. A prefix in the wrong layout is refused."""
    import torch
    from peft import PeftModel

    from personalize.cpu.fastpath import get_fast_decoder
    from personalize.cpu.ia3_scales import read_ia3_scales
    from personalize.cpu.virtual_tokens import read_virtual_tokens
    from personalize.errors import DirectReadUnsupported

    with Personalizer(family) as client:
        users = {"alice": "prompt-tuning", "bob": "p-tuning", "carol": "prefix-tuning", "erin": "ia3", "dave": "lora"}
        adapters = {}
        for user, method in users.items():
            client.add_items(user, _rated(9, prefix=user))
            adapters[user] = client.train(user, method=method)
        decoder = get_fast_decoder(client.model.model, "fp32")
        prompts = [client.prepare(u, PROMPT + " " * i, method="none").built.input_ids for i, u in enumerate(users)]
        prompts = [list(p) + [5] * i for i, p in enumerate(prompts)]  # different lengths
        loaded = client.model
        for user in ("alice", "bob", "carol", "erin"):
            folder = Path(adapters[user].path)
            peft_model = PeftModel.from_pretrained(private_base_copy(loaded.model), adapters[user].path).eval()
            ids = prompts[0]
            with torch.inference_mode():
                want = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0, -1]
            if user == "erin":
                scales = read_ia3_scales(folder, len(decoder.layers))
                assert scales.outputs and scales.inputs  # keys and values; the down projection's input
                got = decoder.last_logits(ids, scales=scales)
                alone = decoder.generate([ids], 6, loaded.eos_ids, loaded.pad_id, scales=[scales])[0]
                text = generate_text(loaded, ids, 6, model=peft_model).text
            else:
                tokens = read_virtual_tokens(folder, decoder.shape)
                got = decoder.last_logits(ids, virtual=tokens)
                alone = decoder.generate([ids], 6, loaded.eos_ids, loaded.pad_id, virtual=[tokens])[0]
                text, _ = greedy_by_forward(loaded, peft_model, ids, 6)
            assert (got - want).abs().max() < 1e-4, user
            assert (got - decoder.last_logits(ids)).abs().max() > 1e-3  # the adapter really moves the logits
            assert loaded.tokenizer.decode(alone, skip_special_tokens=True).strip() == text
        # one batch: three virtual-token methods, IA3, a LoRA and the base, through the serving backend
        key_of = {u: user_key(u) for u in users}
        rows = [DecodeRow(p, AdapterRef.of(key_of[u], adapters[u])) for p, u in zip(prompts, users, strict=True)]
        rows.append(DecodeRow(prompts[1]))
        backend = client.serving.backend
        assert isinstance(backend, FastBackend)
        facts: dict = {}
        together = backend.generate(loaded, rows, 6, facts)
        apart = [backend.generate(loaded, [row], 6, {})[0] for row in rows]
        assert [g.text for g in together] == [g.text for g in apart]
        assert facts["decoder"].startswith("fast-") and facts["adapter_batching"] == "mixed"
        # forgetting a user drops their virtual tokens from the decoder's cache
        backend.evict(key_of["carol"])
        assert not any(key_of["carol"] in n for t in backend._others.values() for n in t.names())
        # a prefix whose width does not fit the decoder's layout: refused with why
        config_path = Path(adapters["carol"].path) / "adapter_config.json"
        wrong = replace_shape(decoder.shape, kv_heads=decoder.shape.kv_heads * 2)
        with pytest.raises(DirectReadUnsupported, match="prefix of width"):
            read_virtual_tokens(config_path.parent, wrong)


def replace_shape(shape, **changes):
    import dataclasses

    return dataclasses.replace(shape, **changes)
