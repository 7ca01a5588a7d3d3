"""One settings object, read from environment variables (prefix ``PERSONALIZE_``) and a ``.env`` file.

Every field has a default that works on a laptop with nothing but the installed packages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_EMBEDDER = "bundled:all-minilm-l6-v2"
# a name in ``personalize.retrieval.RETRIEVERS`` (dense, bm25, recency, or one registered), checked at use time
RetrieverName = str


class AdapterTrainingSettings(BaseModel):
    """How one per-user adapter is trained, whatever its PEFT method: the fields every method shares."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, description="Passes over the user's training pairs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None: no cap).")
    learning_rate: float = Field(
        1e-3,
        gt=0,
        description=(
            "AdamW learning rate. 1e-3 suits a few epochs of rank-8 LoRA on a small model on a CPU; LaMP's paper "
            "used 5e-5 for 30 epochs on FlanT5-XXL."
        ),
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_length: int = Field(256, ge=16, description="Tokens per pair (prompt and output); longer prompts are cut.")
    seed: int = Field(0, description="Seeds the LoRA initialisation, dropout and shuffling: same seed, same adapter.")
    max_items: int | None = Field(
        None, ge=1, description="Train on the most recent N items only (None: all, the default); see max_tokens."
    )
    max_tokens: int | None = Field(
        4_000,
        ge=100,
        description=(
            "Per-user budget: training runs `epochs` passes over all of the user's items, cut to this many tokens "
            "over all steps (None: no cap). So the budget grows with the user's data up to the cap: on movielens "
            "(~62 tokens a pair) a user with up to 32 items gets two full epochs, a larger one 4,000 tokens (~65 "
            "pairs, ~25 s on 2 cores). The cap is what 100 users' adapters cost on a 2-core CPU in under an hour."
        ),
    )
    group_by_length: bool = Field(
        False,
        description="Batch pairs of similar length together (shuffled batches): far less padding where lengths vary, "
        "as in task-adapter pairs with and without retrieved context.",
    )
    trainer: Literal["fast", "plain"] = Field(
        "fast",
        description=(
            "fast: the functional training step of personalize.cpu.fasttrain (Llama-family models, LoRA on the "
            "attention "
            "and MLP projections; the same loss, gradients and dropout masks as peft's, ~1.4x faster on the CPU); "
            "plain: peft's own forward on a private copy of the model. fast falls back to plain, and says why in "
            "the result, where it does not apply."
        ),
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description=(
            "What the frozen base computes in while training: bf16 (the plain step under autocast, the fast step's "
            "projections on bf16 copies of the base weights; the trained weights and optimizer state stay fp32) or "
            "fp32. auto: bf16 where a matmul probe finds it at least 1.5x fp32 on this CPU (AVX-512 BF16, AMX), "
            "else fp32 (AVX2-only CPUs run bf16 at ~1 GFLOP/s). PERSONALIZE_BF16=0|1 overrides the probe."
        ),
    )


class LoraSettings(AdapterTrainingSettings):
    """How one per-user LoRA adapter is trained (the method ``peft`` means)."""

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r: the width of the low-rank update.")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description=(
            "Modules that get a LoRA update: the attention projections of Llama-family models such as SmolLM2 "
            "(attention-only LoRA, as in the LoRA paper, keeps an adapter small: 0.92 M parameters, 3.7 MB in fp32 "
            "at rank 8 on SmolLM2-135M, ~0.7% of the model); use ['q', 'k', 'v', 'o'] for T5/FlanT5."
        ),
    )
    use_rslora: bool = Field(
        False,
        description=(
            "Rank-stabilised LoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(rank) instead of alpha / "
            "rank, so a higher rank still learns at the same pace. The fast trainer, the fast decoder and vLLM "
            "serve it as plain LoRA."
        ),
    )
    use_dora: bool = Field(
        False,
        description=(
            "DoRA (Liu et al. 2024): learn each output's magnitude apart from the LoRA direction (one more vector "
            "per target module). peft's own training step and decoder run it, saying so: the fast step and decoder "
            "cover plain LoRA, and vLLM has no DoRA (those adapters decode locally)."
        ),
    )


class IA3Settings(AdapterTrainingSettings):
    """How one per-user (IA)^3 adapter is trained: learned vectors that rescale keys, values and the MLP's input to
    its down projection (Liu et al. 2022); about 0.05% of SmolLM2-135M's parameters."""

    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="Modules whose activations get a learned scale (Llama names; T5: ['k', 'v', 'wo']).",
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Of target_modules, those scaled on their input (the MLP's) rather than their output.",
    )
    learning_rate: float = Field(
        1e-2, gt=0, description="AdamW learning rate; (IA)^3's few scales need a larger one than LoRA."
    )


class PromptLearningSettings(AdapterTrainingSettings):
    """The fields of the methods that learn virtual tokens in front of every prompt."""

    num_virtual_tokens: int = Field(
        16, ge=1, le=256, description="Virtual tokens the adapter learns; each one costs a position of the prompt."
    )
    learning_rate: float = Field(
        1e-2,
        gt=0,
        description="AdamW learning rate; soft prompts train with larger rates than LoRA (Lester 2021: 0.3).",
    )


class PromptTuningSettings(PromptLearningSettings):
    """Prompt tuning (Lester et al. 2021): the virtual tokens' embeddings are the only trained weights."""


class PTuningSettings(PromptLearningSettings):
    """P-tuning (Liu et al. 2021): an MLP encoder produces the virtual tokens' embeddings."""

    encoder_hidden_size: int = Field(128, ge=1, description="Hidden width of the prompt encoder's MLP.")


class PrefixTuningSettings(PromptLearningSettings):
    """Prefix tuning (Li & Liang 2021): learned keys and values prepended at every layer."""

    prefix_projection: bool = Field(
        False, description="Reparameterise the prefix through an MLP (the paper's trick for stabler training)."
    )


class DistillSettings(LoraSettings):
    """A RAG-distilled LoRA (method peft:distill): trained on what the model answers *with* the user's retrieved
    items, from the prompt *without* them, so serving it needs no retrieval. The teacher's retrieval is rag's."""

    retriever: str | None = Field(
        None, description="The teacher's retriever (dense, bm25 or recency); None: Settings.retriever, as rag uses."
    )
    k: int | None = Field(None, ge=1, le=100, description="Items the teacher retrieves; None: Settings.k.")
    decision: Literal["argmax", "median"] = Field(
        "argmax",
        description="How the teacher turns label log-likelihoods into its answer on label tasks (as the run scores).",
    )
    teacher_max_new_tokens: int = Field(
        32, ge=1, le=512, description="Tokens the teacher generates greedily as the target on generation tasks."
    )


def _task_lora() -> LoraSettings:
    return LoraSettings(
        rank=16,
        alpha=32,
        dropout=0.05,
        epochs=1,
        learning_rate=5e-4,
        batch_size=8,
        max_length=640,
        max_tokens=None,
        group_by_length=True,
    )


class TaskAdapterSettings(BaseModel):
    """How a task adapter is trained (PERSONALIZE_TASK_ADAPTER__*); the default fits ~20 minutes on 2 cores."""

    model_config = ConfigDict(extra="forbid")

    lora: LoraSettings = Field(
        default_factory=_task_lora,
        description=(
            "The shared LoRA (rank 16, one epoch). max_length 640 holds a rag prompt whole (token_budget 512 plus the "
            "chat template and the output): a shorter one would cut a context pair's question off its end."
        ),
    )
    max_pairs: int = Field(2000, ge=1, description="Pairs over all users, at most.")
    max_pairs_per_user: int = Field(40, ge=1, description="Pairs per user, at most (the most recent items).")
    max_tokens: int = Field(
        150_000, ge=1000, description="Tokens of all pairs together, per epoch (the budget that sets the time)."
    )
    context_share: float = Field(0.5, ge=0, le=1, description="Share of pairs that carry retrieved context.")
    retrain_on_forget: bool = Field(
        True, description="forget(user) queues a retrain of every task adapter the user's items trained."
    )


class RouterSettings(BaseModel):
    """Defaults of the uncalibrated router."""

    rag_peft_min_items: int = Field(
        100, ge=1, description="Profile size from which RAG+PEFT is used (when an adapter exists); RAG below it."
    )
    tolerance: float = Field(
        0.01, ge=0, description="Calibration: a cheaper method within this relative distance of the best wins."
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Calibration: a bucket moves to a costlier method only when its gain over the cheaper one is "
        "significant at this level (paired test over the bucket's users).",
    )


class StatsSettings(BaseModel):
    """How reports draw their intervals and tests (personalize.eval.significance)."""

    resamples: int = Field(2000, ge=100, description="Bootstrap resamples of users per interval.")
    permutations: int = Field(9999, ge=99, description="Within-user swaps per paired test (exact when fewer).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of every interval.")
    ci_method: Literal["BCa", "percentile", "basic"] = Field(
        "BCa", description="scipy.stats.bootstrap's method; percentile where BCa is undefined."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Level at which a Holm-adjusted p-value counts as significant.")
    min_users: int = Field(10, ge=2, description="Fewer users than this get no interval or test, and a note saying so.")
    seed: int = Field(0, description="Seed of every resample: the same run gives the same intervals.")


class ApiKey(BaseModel):
    """One API key of the HTTP server and the users it may act for: a list of ids, a prefix, or (neither) all."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(description="The secret the client sends as `Authorization: Bearer KEY`.")
    name: str = Field("", description="A label for logs and metrics (never the key itself).")
    users: list[str] | None = Field(None, description="The exact user ids this key may read, write and forget.")
    prefix: str | None = Field(None, description="Or: every user id that starts with this prefix (a tenant).")

    @model_validator(mode="after")
    def _one_scope(self) -> ApiKey:
        if self.users is not None and self.prefix is not None:
            raise ValueError("give an API key either users or prefix, not both")
        if self.prefix == "":
            raise ValueError("an empty prefix would match every user: leave users and prefix out for that")
        return self

    @property
    def unscoped(self) -> bool:
        """May act for every user, and on what belongs to no user (jobs listing, models)."""
        return self.users is None and self.prefix is None

    def allows(self, user_id: str) -> bool:
        if self.users is not None:
            return user_id in self.users
        return self.prefix is None or user_id.startswith(self.prefix)


class ServerSettings(BaseModel):
    """The HTTP server (``personalize serve``) and, with ``url``, the client mode of ``personalize.generate``.

    ``PERSONALIZE_SERVER`` is either a URL (``http://host:8000``) or this section as JSON
    (``{"url": ..., "api_key": ...}``); the server's own fields also read ``PERSONALIZE_SERVER__HOST`` and so on."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None, description="Client mode: the server personalize.generate, add_items, retrieve and forget call."
    )
    api_key: SecretStr | None = Field(None, description="Client mode: the API key sent to the server.")
    timeout_s: float = Field(300.0, gt=0, description="Client mode: seconds to wait for one answer.")
    host: str = Field("127.0.0.1", description="Where `personalize serve` listens.")
    port: int = Field(8000, ge=0, le=65535, description="The port `personalize serve` listens on.")
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="Keys the server accepts; none: no key is asked and the server listens on 127.0.0.1 only.",
    )
    max_new_tokens: int = Field(512, ge=1, le=4096, description="Most new tokens one request may ask for.")
    max_concurrent: int = Field(
        32, ge=1, description="Generations in flight at once; more are refused with 503 and Retry-After."
    )
    retry_after_s: int = Field(1, ge=0, description="The Retry-After a refused (busy) request is told.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {value[:60]!r}")
        return value.rstrip("/") if value else value


class VllmSettings(BaseModel):
    """The ``vllm`` serving backend (``Settings.decoder == "vllm"``): generation goes to a vLLM OpenAI-compatible
    server, each user's LoRA loaded there at run time (``POST /v1/load_lora_adapter``). The server and its launch
    command read the same fields (``personalize vllm command``)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8100", description="The vLLM server (http://host:port, without /v1).")
    model: str | None = Field(
        None, description="The base model's name on the server; None: the one base model GET /v1/models lists."
    )
    api_key: SecretStr | None = Field(None, description="Sent as `Authorization: Bearer KEY` (vllm --api-key).")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for a connection to the server.")
    timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for one completion (a whole batch).")
    load_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for the server to load one adapter.")
    adapters_dir: str | None = Field(
        None,
        description="The adapter store as the server sees it (a shared mount elsewhere); None: the same path as here.",
    )
    fallback: Literal["fast", "fast-fp32", "plain"] = Field(
        "fast",
        description="The local decoder for what vLLM cannot serve (IA3 and prompt-learning adapters, task-adapted "
        "bases); the answer's decoder_note says why it ran.",
    )
    max_loras: int = Field(4, ge=1, description="Adapters in one batch (the server's --max-loras).")
    max_lora_rank: int = Field(16, ge=1, description="Highest LoRA rank the server takes (--max-lora-rank).")
    python: str | None = Field(
        None,
        description="The python of vLLM's own venv, for `personalize vllm command`; None: $PERSONALIZE_VLLM_PYTHON.",
    )
    threads: int = Field(1, ge=1, description="CPU threads of the server's workers (OMP_NUM_THREADS).")
    kv_cache_gb: int = Field(1, ge=1, description="KV cache of the CPU server in GiB (VLLM_CPU_KVCACHE_SPACE).")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"the vLLM URL must start with http:// or https://, got {value[:60]!r}")
        return value.rstrip("/").removesuffix("/v1")


def parse_server(value: Any) -> Any:
    """``PERSONALIZE_SERVER`` as a URL or as JSON."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        return json.loads(text) if text.startswith("{") else {"url": text}
    return value


class Settings(BaseSettings):
    """Where data lives, which models to load, and the retrieval defaults."""

    model_config = SettingsConfigDict(
        env_prefix="PERSONALIZE_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    home: Path = Field(Path(".personalize"), description="Folder for the embedded database, Chroma, models.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default is SQLite at {home}/personalize.db.")
    chroma: str | None = Field(
        None, description="A folder for embedded Chroma, or http://host:port of a Chroma server; default {home}/chroma."
    )
    model: str = Field(BUNDLED_MODEL, description="Generative model: bundled, a Hugging Face id or a path.")
    embedding_model: str = Field(BUNDLED_EMBEDDER, description="Sentence-transformers model or path.")
    retriever: RetrieverName = Field(
        "dense",
        description="Default retriever: dense, bm25, recency or another registered one (checked when first used).",
    )
    k: int = Field(4, ge=0, le=100, description="Default number of items to retrieve.")
    rerank_candidates: int = Field(
        20, ge=1, le=200, description="First-stage candidates the +rerank retrievers rerank (bm25+rerank, ...)."
    )
    token_budget: int = Field(
        512, ge=32, description="Tokens shared by the input and the retrieved items (LaMP uses 256)."
    )
    input_share: float = Field(0.6, gt=0, le=1, description="Share of the budget the input may keep.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Default number of tokens to generate.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Prompts longer than this are refused.")
    torch_threads: int | None = Field(None, description="torch.set_num_threads; default: torch's own.")
    decoder: Literal["fast", "fast-fp32", "plain", "vllm"] = Field(
        "fast",
        description=(
            "Greedy decoding: 'fast' (fastpath.FastDecoder with 8-bit weight codes and a C decoding step; exactly the "
            "bundled GGUF's weights; fp32 weights where no C compiler is at hand), 'fast-fp32' (the same decoder "
            "with fp32 weights in torch), or 'plain' (Hugging Face generate). Models the fast path does not support "
            "use 'plain'; the result's timings say which path ran and why. 'vllm' sends generation to a vLLM server "
            "(Settings.vllm), the local decoder Settings.vllm.fallback serving what vLLM cannot."
        ),
    )

    # -- adapters and training workers --
    adapters_dir: Path | None = Field(
        None,
        description="Adapter store: a local folder, or a shared mount for several machines; default {home}/adapters.",
    )
    batch_window_ms: float = Field(
        2.0,
        ge=0,
        description="Concurrent generate calls wait this long to share one batched pass (0: never batch them).",
    )
    max_batch: int = Field(8, ge=1, description="Most requests in one batched generate pass.")
    adapter_cache_size: int = Field(8, ge=1, description="Adapters kept loaded in memory (least recently used out).")
    broker_url: str | None = Field(
        None, description="Celery broker: redis://... or amqp://...; default an embedded SQLite broker in {home}."
    )
    auto_train: bool = Field(True, description="Queue (re)training when a user's data grows past the thresholds.")
    train_min_items: int = Field(20, ge=1, description="A user without an adapter is queued for training at this size.")
    retrain_min_new_items: int = Field(50, ge=1, description="Retrain after this many new or changed items...")
    retrain_growth: float = Field(0.2, gt=0, description="...or when the item count grew by this fraction.")
    job_stale_after_s: float = Field(
        120.0, gt=0, description="A running job without a heartbeat for this long belongs to a dead worker."
    )
    job_max_attempts: int = Field(3, ge=1, description="Attempts before a training job is marked failed.")
    job_recover_every_s: float = Field(
        60.0,
        ge=0,
        description="Workers look this often for lost jobs (dead workers, messages a broker restart dropped); 0: only "
        "when a worker starts.",
    )
    train_time_limit_s: int = Field(3600, ge=10, description="Hard time limit of one training task.")
    router: RouterSettings = Field(
        default_factory=RouterSettings, description="Defaults of the uncalibrated router (PERSONALIZE_ROUTER__...)."
    )
    stats: StatsSettings = Field(
        default_factory=StatsSettings, description="Intervals and tests of reports (PERSONALIZE_STATS__*)."
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRA training settings (PERSONALIZE_LORA__RANK=16)."
    )
    ia3: IA3Settings = Field(default_factory=IA3Settings, description="(IA)^3 adapters (method peft:ia3).")
    prompt_tuning: PromptTuningSettings = Field(
        default_factory=PromptTuningSettings, description="Prompt-tuning adapters (peft:prompt-tuning)."
    )
    p_tuning: PTuningSettings = Field(default_factory=PTuningSettings, description="P-tuning adapters (peft:p-tuning).")
    prefix_tuning: PrefixTuningSettings = Field(
        default_factory=PrefixTuningSettings, description="Prefix-tuning adapters (peft:prefix-tuning)."
    )
    distill: DistillSettings = Field(
        default_factory=DistillSettings, description="RAG-distilled LoRA adapters (peft:distill)."
    )
    adapter_probe: bool = Field(
        True,
        description="After an adapter loads, check on a probe input that it changes the model's logits beyond float "
        "noise, and refuse it otherwise (an adapter that targets nothing would be served as the base model).",
    )
    task_adapter: TaskAdapterSettings = Field(
        default_factory=TaskAdapterSettings,
        description="How task adapters are trained (PERSONALIZE_TASK_ADAPTER__MAX_PAIRS=...).",
    )
    base: Literal["task", "zero-shot"] = Field(
        "task",
        description=(
            "What none/rag/peft/rag+peft run on: 'task' is the base model with the task's adapter merged in, where "
            "one exists for the task and model (else the base model); 'zero-shot' is always the base model. The "
            "method 'zero-shot' is the base model whatever this says."
        ),
    )
    server: Annotated[ServerSettings, NoDecode] = Field(
        default_factory=ServerSettings,
        description="The HTTP server and the client mode (PERSONALIZE_SERVER=http://host:port, or JSON).",
    )
    vllm: VllmSettings = Field(
        default_factory=VllmSettings, description="The vLLM serving backend (PERSONALIZE_VLLM__URL=http://...)."
    )
    max_item_chars: int = Field(
        200_000,
        ge=1,
        description=(
            "Largest item accepted, in characters of its text, output and fields together: one 52 MB item took 9.7 "
            "GB to import. Longer items are refused with an error naming this setting."
        ),
    )

    @field_validator("server", mode="before")
    @classmethod
    def _parse_server(cls, value: Any) -> Any:
        return parse_server(value)

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'personalize.db'}"

    def adapter_settings(self, method: str) -> AdapterTrainingSettings:
        """The training settings of adapter method ``method`` ('lora', 'ia3', 'prompt-tuning', ...): the section
        named after it (dashes as underscores)."""
        section = getattr(self, method.replace("-", "_"), None)
        if not isinstance(section, AdapterTrainingSettings):
            raise ValueError(f"no settings section for adapter method {method!r}")
        return section

    @property
    def chroma_is_server(self) -> bool:
        return self.chroma is not None and self.chroma.startswith(("http://", "https://"))

    @property
    def chroma_path(self) -> Path:
        if self.chroma and not self.chroma_is_server:
            return Path(self.chroma).expanduser().resolve()
        return self.resolved_home / "chroma"

    @property
    def users_dir(self) -> Path:
        return self.resolved_home / "users"

    @property
    def models_dir(self) -> Path:
        return self.resolved_home / "models"

    @property
    def resolved_adapters_dir(self) -> Path:
        return (self.adapters_dir.expanduser().resolve()) if self.adapters_dir else self.resolved_home / "adapters"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.resolved_home / 'broker.sqlite'}"
