"""Serving the PEFT family: each adapter method's answer time on peft's path against the fast decoder, one row.

    python benchmarks/family_serve.py                       # 2 interleaved rounds, 256-token prompt, 16 new tokens
    python benchmarks/family_serve.py --prompt-tokens 672   # reuters-lead's prompt length (the plain virtual-token
                                                            # path then costs ~1.4 s per new token)

One adapter per method (LoRA, IA3, prompt tuning, P-tuning, prefix tuning) is built with peft on the bundled model,
with random non-trivial weights (serving speed does not depend on how well an adapter was trained), and saved in
peft's format. Each answer is greedy, one prompt, through the serving backends as ``generate`` uses them: the plain
backend (peft: ``generate`` for LoRA and IA3, a full forward pass per new token for the virtual-token methods, which
peft's ``generate`` gets wrong) and the fast backend (8-bit weights; adapters read from their folders: LoRA tables,
IA3 scales, virtual tokens). The paths take turns, the first alternating per round; medians over rounds, adapters
warm (each path's cache loaded before timing). "same text" compares the fast decoder on fp32 weights with peft (the
8-bit weights are the GGUF's own and may differ from its fp32 dequantisation in a token). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import contention_note, footer, loadavg, median, table

from personalize.adapters.format import ADAPTER_METADATA, METADATA_FORMAT
from personalize.adapters.peft_utils import private_base_copy
from personalize.serving.backend import AdapterRef, DecodeRow
from personalize.serving.fast_backend import FastBackend
from personalize.serving.hf_backend import HFBackend
from personalize.serving.modeling import LoadedModel, load_model
from personalize.settings import BUNDLED_MODEL

METHODS = ("lora", "ia3", "prompt-tuning", "p-tuning", "prefix-tuning")
TEXT = (
    "Write the opening sentence for the following news article: The company said on Tuesday that its quarterly "
    "results would beat analysts' forecasts, as demand for its products in Asia and Europe grew faster than expected "
    "and costs fell. "
)


def peft_config(method: str) -> tuple[Any, str]:
    """The method's peft config (random-initialised where peft would start at a no-op) and its peft type."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if method == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        return LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False), "LORA"
    if method == "ia3":
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        )
        return config, "IA3"
    if method == "prompt-tuning":
        return PromptTuningConfig(num_virtual_tokens=16), "PROMPT_TUNING"
    if method == "p-tuning":
        return PromptEncoderConfig(num_virtual_tokens=16, encoder_hidden_size=128), "P_TUNING"
    return PrefixTuningConfig(num_virtual_tokens=16), "PREFIX_TUNING"


def build_adapter(loaded: LoadedModel, method: str, folder: Path, seed: int) -> AdapterRef:
    """One adapter of ``method`` saved in peft's format, with the metadata the caches check."""
    import torch
    from peft import get_peft_model

    config, peft_type = peft_config(method)
    config.task_type = "CAUSAL_LM"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(private_base_copy(loaded.model), config)
        if method == "ia3":  # random scales near 1 (peft's non-default init is near 0: an unusable model)
            for name, param in model.named_parameters():
                if "ia3_l" in name:
                    param.data = 1 + 0.2 * torch.randn_like(param)
        model.save_pretrained(str(folder))
    metadata = {"format": METADATA_FORMAT, "base_model": loaded.name, "owner": f"bench-{method}"}
    (folder / ADAPTER_METADATA).write_text(json.dumps(metadata))
    return AdapterRef(f"bench{seed}", folder, 1, peft_type=peft_type, method=method)


def answer(backend: Any, loaded: LoadedModel, row: DecodeRow, new_tokens: int) -> tuple[float, str, dict]:
    facts: dict = {}
    start = time.perf_counter()
    out = backend.generate(loaded, [row], new_tokens, facts)
    return time.perf_counter() - start, out[0].text, facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--home", type=Path, help="folder for the model cache and the adapters (default: temporary)")
    args = parser.parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    started, load_start = time.perf_counter(), loadavg()
    home = args.home or Path(tempfile.mkdtemp(prefix="family-serve-"))
    loaded = load_model(BUNDLED_MODEL, home / "models")
    ids = loaded.tokenizer(TEXT * (args.prompt_tokens // 40 + 1))["input_ids"][: args.prompt_tokens]
    methods = [m for m in args.methods.split(",") if m]
    refs = {}
    for seed, method in enumerate(methods):
        folder = home / "adapters" / method
        folder.mkdir(parents=True, exist_ok=True)
        refs[method] = build_adapter(loaded, method, folder, seed)
    plain = HFBackend(probe=True)
    fast, fast_fp32 = FastBackend(plain), FastBackend(plain, fp32_only=True)
    paths = {"peft (plain)": plain, "fast decoder": fast}
    times: dict[tuple[str, str], list[float]] = {}
    facts_of: dict[tuple[str, str], dict] = {}
    texts: dict[tuple[str, str], str] = {}
    rows = {m: DecodeRow(ids, refs[m]) for m in methods}
    for method in methods:  # warm: every path's caches hold the adapter, and the fp32 check runs untimed
        for name, backend in [*paths.items(), ("fast fp32", fast_fp32)]:
            _, texts[(method, name)], _ = answer(backend, loaded, rows[method], args.new_tokens)
    for round_index in range(args.rounds):
        for method in methods:
            order = list(paths.items())
            if (round_index + methods.index(method)) % 2:
                order.reverse()
            for name, backend in order:
                seconds, _, facts = answer(backend, loaded, rows[method], args.new_tokens)
                times.setdefault((method, name), []).append(seconds)
                facts_of[(method, name)] = facts
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    print(
        f"\nOne greedy answer per method on {BUNDLED_MODEL}: a {len(ids)}-token prompt, {args.new_tokens} new tokens, "
        f"one row; median of {args.rounds} interleaved round(s), adapters warm"
    )
    note = contention_note()
    if note:
        print(note)
    table_rows = []
    for method in methods:
        slow, quick = median(times[(method, "peft (plain)")]), median(times[(method, "fast decoder")])
        decoder = facts_of[(method, "fast decoder")].get("decoder", "?")
        same = texts[(method, "fast fp32")] == texts[(method, "peft (plain)")]
        table_rows.append(
            [method, f"{slow:.2f}", f"{quick:.2f}", decoder, f"{slow / quick:.1f}x", "yes" if same else "NO"]
        )
    headers = [
        "method",
        "peft path s",
        "fast decoder s",
        "fast decoder ran",
        "speed-up",
        "same text (fast fp32 vs peft)",
    ]
    print(table(headers, table_rows))
    for line in footer("benchmarks/family_serve.py", argv or [], load_start, started, None):
        print(line)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
