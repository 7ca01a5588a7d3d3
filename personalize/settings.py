"""One settings object, read from environment variables (prefix ``PERSONALIZE_``) and a ``.env`` file.

Every field has a default that works on a laptop with nothing but the installed packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_EMBEDDER = "bundled:all-minilm-l6-v2"
RetrieverName = Literal["dense", "bm25", "recency"]


class Settings(BaseSettings):
    """Where data lives, which models to load, and the retrieval defaults."""

    model_config = SettingsConfigDict(env_prefix="PERSONALIZE_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".personalize"), description="Folder for the embedded database, Chroma, models.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default is SQLite at {home}/personalize.db.")
    chroma: str | None = Field(
        None, description="A folder for embedded Chroma, or http://host:port of a Chroma server; default {home}/chroma."
    )
    model: str = Field(BUNDLED_MODEL, description="Generative model: bundled, a Hugging Face id or a path.")
    embedding_model: str = Field(BUNDLED_EMBEDDER, description="Sentence-transformers model or path.")
    retriever: RetrieverName = Field("dense", description="Default retriever: dense, bm25 or recency.")
    k: int = Field(4, ge=0, le=100, description="Default number of items to retrieve.")
    token_budget: int = Field(
        512, ge=32, description="Tokens shared by the input and the retrieved items (LaMP uses 256)."
    )
    input_share: float = Field(0.6, gt=0, le=1, description="Share of the budget the input may keep.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Default number of tokens to generate.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Prompts longer than this are refused.")
    torch_threads: int | None = Field(None, description="torch.set_num_threads; default: torch's own.")

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'personalize.db'}"

    @property
    def chroma_is_server(self) -> bool:
        return bool(self.chroma) and self.chroma.startswith(("http://", "https://"))

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
