"""Per-user LoRA training: pairs per task (LAMP.md section 4), and what training may and may not leave behind."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_loaded

from personalize.adapters.training import (
    ADAPTER_METADATA,
    AdapterExistsError,
    LoraSettings,
    TrainingCancelled,
    encode_pair,
    train_adapter,
    training_pairs,
)
from personalize.data.items import ProfileItem
from personalize.errors import InvalidInputError
from personalize.tasks.prompting import encode
from personalize.tasks.registry import get_task

FAST = {"max_length": 48, "batch_size": 4}
TWEET = "the storm moved east over the plains and the farmers watched the sky turn green before the rain"
WORDS = TWEET.split(" ")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return make_tiny_loaded(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_loaded(tiny_chat_model_dir):
    return make_tiny_loaded(tiny_chat_model_dir, chat_template=True)


def rating_pairs(n: int = 8) -> list[tuple[str, str]]:
    genres = ["Sci-Fi", "Romance", "Horror", "Comedy"]
    items = [
        ProfileItem(str(i), f"Film {i} ({genres[i % 4]})", output=str(5 if i % 4 == 0 else 2), task="movielens-rating")
        for i in range(n)
    ]
    return training_pairs(items)


def base_logits(loaded) -> torch.Tensor:
    ids = torch.tensor([encode(loaded, "a probe sentence about the weather")])
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


# --- pairs --------------------------------------------------------------------------------------------------------


def test_labelled_items_use_the_task_input_template():
    rating = ProfileItem("1", "Alien (Horror, Sci-Fi)", output="5", task="movielens-rating")
    lead = {"title": "The lead.", "text": "The body of it."}
    headline = ProfileItem("2", "The lead. The body of it.", fields=lead, output="The lead.")
    tag = ProfileItem("3", "a heist", fields={"description": "a heist", "tag": "action"}, output="action")
    paper = ProfileItem("4", "t a", fields={"title": "Deep Nets", "abstract": "We study."}, output="We study.")
    assert training_pairs([rating]) == [(get_task("movielens-rating").input_template.format(text=rating.text), "5")]
    assert training_pairs([headline], "reuters-lead") == [
        ("Write the opening sentence for the following news article: The body of it.", "The lead.")
    ]
    assert training_pairs([tag], "lamp-2")[0][0].endswith("description: a heist")
    assert training_pairs([tag], "lamp-2")[0][1] == "action"
    assert training_pairs([paper], "lamp-1") == [("Write an abstract for this title: Deep Nets", "We study.")]


def test_tweets_continue_from_their_first_10_to_25_percent_of_words():
    tweets = [ProfileItem(f"t{i}", " ".join(WORDS[i:] + WORDS[:i])) for i in range(10)]
    pairs = training_pairs(tweets, "lamp-7")
    assert len(pairs) == 10
    for tweet, (prompt, rest) in zip(tweets, pairs, strict=True):
        assert prompt.startswith("Complete the following tweet: ")
        head = prompt.removeprefix("Complete the following tweet: ")
        assert f"{head} {rest}" == tweet.text
        assert 0.10 * len(WORDS) - 1 <= len(head.split()) <= 0.25 * len(WORDS) + 1
    assert pairs == training_pairs(tweets, "lamp-7")  # deterministic


def test_authorship_continues_30_words_with_the_next_60():
    article = " ".join(f"w{i}" for i in range(120))
    item = ProfileItem("a", article, fields={"title": "w0", "text": "..."}, output="w0", task="reuters-authorship")
    [(prompt, output)] = training_pairs([item])
    assert prompt == "Continue this article: " + " ".join(f"w{i}" for i in range(30))
    assert output == " ".join(f"w{i}" for i in range(30, 90))


def test_unlabelled_generic_items_continue_their_text_and_short_ones_are_skipped():
    long = ProfileItem("1", " ".join(WORDS))
    labelled = ProfileItem("2", "Summarise my week", output="Busy.")
    short = ProfileItem("3", "too short")
    pairs = training_pairs([long, labelled, short])
    assert pairs[0] == ("Continue this text: " + " ".join(WORDS[:4]), " ".join(WORDS[4:]))
    assert pairs[1] == ("Summarise my week", "Busy.")
    assert len(pairs) == 2
    # a labelled task whose item lacks its label falls back to continuation as well
    assert training_pairs([long], "movielens-rating")[0][0].startswith("Continue this text: ")


def test_max_items_keeps_the_most_recent_items():
    start = datetime(2020, 1, 1)
    items = [
        ProfileItem(str(i), f"Film {i}", output="3", timestamp=start + timedelta(days=(7 * i) % 10)) for i in range(10)
    ]
    pairs = training_pairs(items, "movielens-rating", max_items=3)
    newest = sorted(items, key=lambda item: item.timestamp)[-3:]
    assert [p[0].rsplit(": ", 1)[1] for p in pairs] == [item.text for item in newest]


def test_chat_prompt_tokens_carry_no_loss(chat_loaded):
    example = encode_pair(chat_loaded, "Rate Alien", "5", max_length=64)
    prompt_ids = encode(chat_loaded, "Rate Alien")
    n = len(prompt_ids)
    assert example.input_ids[:n] == prompt_ids
    assert example.labels[:n] == [-100] * n
    assert example.labels[n:] == example.input_ids[n:]
    assert example.labels[-1] == chat_loaded.model.generation_config.eos_token_id


def test_long_pairs_fit_max_length_keeping_the_template(chat_loaded):
    prompt = "Generate a headline for the following article: " + " ".join(WORDS * 20)
    example = encode_pair(chat_loaded, prompt, " ".join(WORDS * 10), max_length=64)
    assert len(example.input_ids) == len(example.labels) <= 64
    assert 0 < sum(label != -100 for label in example.labels) <= 32
    prompt_ids = example.input_ids[: example.labels.index(next(x for x in example.labels if x != -100))]
    full = encode(chat_loaded, prompt)
    a, b = encode(chat_loaded, "apple"), encode(chat_loaded, "pear")
    head = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    tail = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y)
    assert prompt_ids[: head + 8] == full[: head + 8]  # the user turn starts as before: the prompt was cut at its end
    assert prompt_ids[-tail:] == a[-tail:]  # and the assistant turn still follows it


def test_a_left_padded_batch_has_the_loss_of_its_pairs_one_by_one(loaded):
    from personalize.adapters.training import _collate, _loss

    pairs = [("short", "one two"), ("a much longer prompt with many words in it", "x"), ("mid prompt", "a b c d e")]
    examples = [encode_pair(loaded, p, o, 64) for p, o in pairs]
    batch, _ = _collate(examples, loaded.tokenizer.pad_token_id, is_encoder_decoder=False)
    total = n = 0
    with torch.no_grad():
        batched = _loss(loaded.model, batch, is_encoder_decoder=False, keep_logits=True)
        for e in examples:
            k = sum(label != -100 for label in e.labels)
            total += loaded.model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * k
            n += k
    assert batched.item() == pytest.approx((total / n).item(), abs=1e-5)


# --- training -----------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_on_the_users_pairs(loaded, tmp_path):
    settings = LoraSettings(epochs=6, learning_rate=1e-2, **FAST)
    result = train_adapter(loaded, rating_pairs(), settings, tmp_path / "adapter")
    assert result.steps == 12 and len(result.losses) == 12 and result.n_pairs == 8
    assert result.final_loss < result.losses[0] - 0.4  # a random tiny model's logits cannot fall far below ln(V)


def test_same_seed_gives_identical_adapter_weights(loaded, tmp_path):
    pairs = rating_pairs()
    runs = [
        train_adapter(loaded, pairs, LoraSettings(seed=seed, max_steps=3, **FAST), tmp_path / name)
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    weights = [load_file(run.path / "adapter_model.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert runs[0].losses == runs[1].losses
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_training_leaves_the_base_model_unchanged(loaded, tmp_path):
    before_logits = base_logits(loaded)
    before_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    before_grad = {k: p.requires_grad for k, p in loaded.model.named_parameters()}
    rng_before = torch.random.get_rng_state()
    train_adapter(loaded, rating_pairs(), LoraSettings(max_steps=2, **FAST), tmp_path / "adapter")
    assert torch.equal(base_logits(loaded), before_logits)
    after_state = loaded.model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert {k: p.requires_grad for k, p in loaded.model.named_parameters()} == before_grad
    assert not loaded.model.training
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is not consumed


def test_adapter_folder_is_peft_format_with_metadata_and_loads(loaded, tmp_path):
    from peft import PeftModel

    from personalize.adapters.peft_utils import private_base_copy

    out = tmp_path / "users" / "adapter"
    result = train_adapter(loaded, rating_pairs(), LoraSettings(max_steps=2, learning_rate=5e-2, **FAST), out)
    assert result.path == out
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_METADATA} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no temporary folder left beside it
    meta = json.loads((out / ADAPTER_METADATA).read_text())
    assert meta["n_pairs"] == 8 and meta["seed"] == 0 and meta["base_model"] == loaded.name
    assert meta["final_loss"] == pytest.approx(result.final_loss) and meta["config"]["rank"] == 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert result.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    peft_model = PeftModel.from_pretrained(private_base_copy(loaded.model), out)
    ids = torch.tensor([encode(loaded, "a probe sentence about the weather")])
    with torch.no_grad():
        assert not torch.equal(peft_model(input_ids=ids).logits, base_logits(loaded))


def test_progress_is_reported_and_should_stop_cancels_without_writing(loaded, tmp_path):
    seen: list[tuple[float, float | None]] = []
    out = tmp_path / "adapter"
    with pytest.raises(TrainingCancelled):
        train_adapter(
            loaded,
            rating_pairs(),
            LoraSettings(epochs=3, **FAST),
            out,
            progress=lambda fraction, loss: seen.append((fraction, loss)),
            should_stop=lambda: len(seen) >= 2,
        )
    assert [fraction for fraction, _ in seen] == [1 / 6, 2 / 6]
    assert all(isinstance(loss, float) for _, loss in seen)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_adapter_folder_and_empty_pairs_are_refused(loaded, tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(AdapterExistsError):
        train_adapter(loaded, rating_pairs(), LoraSettings(max_steps=1, **FAST), tmp_path / "adapter")
    with pytest.raises(InvalidInputError):
        train_adapter(loaded, [], LoraSettings(**FAST), tmp_path / "other")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_chat_model_trains_and_loss_falls(chat_loaded, tmp_path):
    result = train_adapter(
        chat_loaded, rating_pairs(), LoraSettings(epochs=6, learning_rate=1e-2, **FAST), tmp_path / "adapter"
    )
    assert result.final_loss < result.losses[0] - 0.4  # a random tiny model's logits cannot fall far below ln(V)


def test_settings_reject_unknown_fields_and_bad_values():
    with pytest.raises(ValueError):
        LoraSettings(rnak=4)
    with pytest.raises(ValueError):
        LoraSettings(rank=0)
    assert LoraSettings.model_fields["learning_rate"].description


def test_group_by_length_keeps_every_pair_once_and_cuts_padding():
    import torch

    from personalize.adapters.training import group_by_length

    lengths = [60 if i % 2 else 600 for i in range(64)]
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = group_by_length(order, lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(grouped) == list(range(64))

    def padded(o: list[int]) -> int:
        return sum(8 * max(lengths[i] for i in o[b : b + 8]) for b in range(0, len(o), 8))

    assert padded(grouped) < 0.7 * padded(order)
    assert group_by_length(order, lengths, 8, torch.Generator().manual_seed(1)) == grouped  # seeded


def test_the_precision_probe_and_a_bf16_training_run(loaded, tmp_path, monkeypatch):
    """The probe measures both rates once per process; bf16 asked for trains on the fast step (its projections on
    bf16 copies, LoRA weights still fp32) to a loss near fp32's and says so; auto follows the probe (forced off
    here)."""
    from personalize.cpu.precision import probe, training_precision

    rates = probe()
    assert rates.fp32 > 0 and rates.bf16 > 0 and probe() is rates  # cached
    assert training_precision("auto")[0] == "fp32"  # PERSONALIZE_BF16=0 in the suite
    monkeypatch.setenv("PERSONALIZE_BF16", "1")
    assert training_precision("auto")[0] == "bf16"
    monkeypatch.setenv("PERSONALIZE_BF16", "0")
    settings = LoraSettings(epochs=2, trainer="fast", **FAST)
    _, bf16 = _trained_in_fp32_and_bf16(loaded, settings, tmp_path)
    assert (bf16.trainer, bf16.trainer_note) == ("fast", None)


def _trained_in_fp32_and_bf16(loaded, settings, tmp_path):  # noqa: ANN001, ANN202
    """One adapter per precision on the same pairs (``settings`` as given, then with bf16 asked for), checked for
    what bf16 promises: a loss within 5% of fp32's, the precision in the metadata, the adapter's own weights fp32."""
    pairs = [(f"question {i} about films", f"answer {i % 3}") for i in range(8)]
    fp32 = train_adapter(loaded, pairs, settings, tmp_path / "fp32")
    bf16 = train_adapter(loaded, pairs, settings.model_copy(update={"precision": "bf16"}), tmp_path / "bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert json.loads((tmp_path / "bf16" / ADAPTER_METADATA).read_text())["precision"] == "bf16"
    assert abs(bf16.final_loss - fp32.final_loss) <= 0.05 * fp32.final_loss
    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())  # the adapter itself stays fp32
    return fp32, bf16


def test_the_probe_times_the_models_widths_unless_bf16_crawls():
    """The probe measures at a projection's shape (a 128 square under-read AVX512-BF16 as 1.2x where the model's
    matmuls run 2x); only a screen that shows bf16 crawling ends it early, and it leaves torch's threads as found."""
    from personalize.cpu.precision import PROBE_SHAPE, SCREEN_SHAPE, MatmulRates, bf16_crawls, probe

    threads = torch.get_num_threads()
    probe.cache_clear()
    rates = probe()
    assert torch.get_num_threads() == threads
    assert rates.shape in (PROBE_SHAPE, SCREEN_SHAPE)
    if rates.shape == SCREEN_SHAPE:
        assert bf16_crawls(rates)
    assert bf16_crawls(MatmulRates(60.0, 1.0, SCREEN_SHAPE))  # AVX2: ~1 vs ~60 GFLOP/s
    assert not bf16_crawls(MatmulRates(72.0, 32.0, SCREEN_SHAPE))  # AVX512-BF16 at 64^3: slower, not crawling
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        assert rates.shape == PROBE_SHAPE


@pytest.mark.parametrize("method", ["ia3", "prompt-tuning", "p-tuning", "prefix-tuning"])
def test_every_plain_step_method_trains_under_bf16_autocast_near_fp32(loaded, tmp_path, method):
    """Where bf16 pays, ``auto`` trains the plain-step methods under bf16 autocast: each must train to a loss near
    fp32's and keep its own weights fp32, as LoRA's plain step does."""
    from personalize.adapters.methods import get_adapter_method

    spec = get_adapter_method(method)
    settings = spec.settings_class(epochs=2, **FAST)
    if hasattr(settings, "num_virtual_tokens"):
        settings = settings.model_copy(update={"num_virtual_tokens": 4})
    fp32, bf16 = _trained_in_fp32_and_bf16(loaded, settings.model_copy(update={"precision": "fp32"}), tmp_path)
    assert torch.isfinite(torch.tensor(bf16.final_loss)) and (fp32.trainer, bf16.trainer) == ("plain", "plain")
