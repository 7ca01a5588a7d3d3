"""Request bodies, as the OpenAPI schema publishes them. Types are strict (no ``"1"`` for 1, no ``true`` for an
id); the library then validates values exactly as in-process (``add_items``, ``generate``), naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Scalar = StrictStr | StrictInt | StrictFloat


class ItemIn(BaseModel):
    """One profile item, as ``add_items`` takes it."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt = Field(description="Unique per user; an integer is stored as its digits.")
    text: StrictStr
    fields: dict[str, Any] | None = None
    output: Scalar | None = Field(None, description="The item's label (a string, or a number written as text).")
    timestamp: Scalar | None = Field(None, description="ISO 8601 date/time, or Unix seconds.")
    task: StrictStr | None = None


class ItemsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(description="Upserted all or nothing.")


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr
    prompt: StrictStr
    method: StrictStr = Field("auto", description="auto, none, rag, peft, rag+peft or zero-shot.")
    k: StrictInt | None = None
    max_new_tokens: StrictInt | None = Field(None, description="At most the server's cap (512 by default).")
    retriever: StrictStr | None = None
    task: StrictStr | None = None


class RetrieveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    k: StrictInt | None = None
    retriever: StrictStr | None = None


class TrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: StrictBool = Field(False, description="Queue even if the adapter is up to date.")


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatIn(BaseModel):
    """OpenAI's chat completion request; sampling parameters are accepted and ignored (decoding is greedy)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(description="personalize (the router picks) or personalize:<method>.")
    messages: list[ChatMessage] = Field(min_length=1)
    user: StrictStr | None = Field(None, description="The user id to personalize for (required).")
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, description="Only 1.")
    k: StrictInt | None = Field(None, description="personalize: items to retrieve.")
    retriever: StrictStr | None = Field(None, description="personalize: the retriever.")
    task: StrictStr | None = Field(None, description="personalize: the task.")
