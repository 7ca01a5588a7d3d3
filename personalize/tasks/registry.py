"""The task registry: how an item becomes retrieval text, a RAG item, and how a RAG prompt is put together.

Each task is data (templates, fields, labels, metrics) in one ``Task`` value; the few differences LaMP has
(LaMP-1 inserts retrieved titles into its input) are small functions named here, not branches scattered around.
Templates follow ../shared/LAMP.md sections 3-5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personalize.data.checks import short
from personalize.errors import InvalidInputError

if TYPE_CHECKING:
    from personalize.data.items import ProfileItem

LAMP2_TAGS = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)


@dataclass(frozen=True)
class Task:
    """Everything that differs between tasks, stated once."""

    name: str
    description: str
    item_fields: tuple[str, ...]
    doc_fields: tuple[str, ...]
    rag_template: str
    trunc_field: str
    output_field: str | None = None
    rag_prefix: str = ""
    rag_join: str = ", and "
    rag_suffix: str = ". {input}"
    query_marker: str | None = None
    labels: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ()
    input_template: str | None = None
    lamp_name: str | None = None
    synthetic: bool = False
    choice: bool = False  # the label picks one of the candidates in the input (LaMP-1): profile items carry no label
    compose: Callable[[Task, str, list[str]], str] | None = field(default=None, compare=False, repr=False)

    def item_values(self, item: ProfileItem) -> dict[str, Any]:
        """The item's fields, with ``text`` and the output field filled from the item when absent."""
        values: dict[str, Any] = dict(item.fields or {})
        values.setdefault("text", item.text)
        if self.output_field and item.output is not None:
            values.setdefault(self.output_field, item.output)
        values.setdefault("output", item.output or "")
        return values

    def doc_text(self, values: dict[str, Any]) -> str:
        """Retrieval text for an item (LAMP.md section 4, 'Document text per item')."""
        parts = [str(values.get(f, "")).strip() for f in self.doc_fields]
        return " ".join(p for p in parts if p)

    def render_item(self, values: dict[str, Any]) -> str:
        return self.rag_template.format_map(Defaulting(values))

    def query_text(self, prompt: str) -> str:
        """The part of the input that retrieval uses (LAMP.md section 4, 'Retrieval query')."""
        if self.query_marker is None:
            return prompt
        if self.query_marker == ":":
            head, sep, tail = prompt.partition(":")
            return tail.strip() if sep and tail.strip() else prompt
        idx = prompt.rfind(self.query_marker)
        if idx < 0:
            return prompt
        tail = prompt[idx + len(self.query_marker) :].strip()
        return tail or prompt

    def build_prompt(self, prompt: str, rendered: list[str]) -> str:
        if not rendered:
            return prompt
        if self.compose is not None:
            return self.compose(self, prompt, rendered)
        return self.rag_prefix + self.rag_join.join(rendered) + self.rag_suffix.format(input=prompt)


class Defaulting(dict):
    """``str.format_map`` values where a missing field reads as empty (a template naming a field an item lacks)."""

    def __missing__(self, key: str) -> str:
        return ""


def _lamp1_compose(task: Task, prompt: str, rendered: list[str]) -> str:
    """LaMP-1 puts the retrieved titles after the word 'title' in the input."""
    joined = task.rag_join.join(rendered)
    if " title " in prompt:
        head, _, tail = prompt.partition(" title ")
        return f"{head} title {joined}, and {tail}"
    return f"{joined}. {prompt}"


def choice_candidates(prompt: str) -> list[str] | None:
    """The two quoted choices of a ``[1]: "..." [2]: "..."`` input (quotes inside a choice are kept), or ``None``."""
    first, second = prompt.find('[1]: "'), prompt.find('" [2]: "')
    if first < 0 or second < first:
        return None
    one = prompt[first + 6 : second]
    two = prompt[second + 8 :]
    two = two[: two.rfind('"')] if '"' in two else two
    return [one, two]


def _lamp1_query(prompt: str) -> str:
    """Both choices of a LaMP-1-style input, joined: what retrieval searches with."""
    choices = choice_candidates(prompt)
    return prompt if choices is None else " ".join(choices)


class _Lamp1Task(Task):
    def query_text(self, prompt: str) -> str:
        return _lamp1_query(prompt)


class _AuthorshipTask(Task):
    def query_text(self, prompt: str) -> str:
        return _lamp1_query(prompt)


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def get_task(name: str | None) -> Task:
    if name is not None and not isinstance(name, str):
        raise InvalidInputError(f"task must be a string, got {type(name).__name__}")
    key = (name or "generic").lower().replace("_", "-")
    if key not in _TASKS:
        raise InvalidInputError(f"unknown task {short(name)}; known tasks: {', '.join(sorted(_TASKS))}", "task")
    return _TASKS[key]


def task_names() -> list[str]:
    return sorted(_TASKS)


register(
    Task(
        name="generic",
        description="Free-form items: retrieved items are listed as context before the prompt.",
        item_fields=("text",),
        doc_fields=("text",),
        rag_template="{text}",
        trunc_field="text",
        # a plain list works best with small chat models (SmolLM2-135M ignores a quoted, joined sentence)
        rag_prefix="Context about me:\n- ",
        rag_join="\n- ",
        rag_suffix="\n\n{input}",
        output_field="output",
    )
)
register(
    _Lamp1Task(
        name="lamp-1",
        lamp_name="LaMP_1",
        description="Citation identification (binary choice).",
        item_fields=("title", "abstract"),
        doc_fields=("title", "abstract"),
        rag_template='"{title}"',
        trunc_field="title",
        labels=("[1]", "[2]"),
        choice=True,
        metrics=("accuracy", "f1"),
        input_template="Write an abstract for this title: {title}",
        output_field="abstract",
        compose=_lamp1_compose,
    )
)
register(
    Task(
        name="lamp-2",
        lamp_name="LaMP_2",
        description="Movie tagging (15 tags).",
        item_fields=("description", "tag"),
        doc_fields=("description",),
        rag_template='the tag for the movie: "{description}" is "{tag}"',
        trunc_field="description",
        query_marker="description:",
        labels=LAMP2_TAGS,
        metrics=("accuracy", "f1"),
        output_field="tag",
        input_template=(
            "Which tag does this movie relate to among the following tags? Just answer with the tag name without "
            "further explanation. tags: [" + ", ".join(LAMP2_TAGS) + "] description: {description}"
        ),
    )
)
register(
    Task(
        name="lamp-3",
        lamp_name="LaMP_3",
        description="Product rating (1-5).",
        item_fields=("text", "score"),
        doc_fields=("text",),
        rag_template='{score} is the score for "{text}"',
        trunc_field="text",
        query_marker="review:",
        labels=("1", "2", "3", "4", "5"),
        metrics=("mae", "rmse"),
        output_field="score",
        input_template=(
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: {text}"
        ),
    )
)
register(
    Task(
        name="lamp-4",
        lamp_name="LaMP_4",
        description="News headline generation.",
        item_fields=("title", "text"),
        doc_fields=("title", "text"),
        rag_template='"{title}" is the title for "{text}"',
        trunc_field="text",
        query_marker="article:",
        metrics=("rouge-1", "rouge-l"),
        output_field="title",
        input_template="Generate a headline for the following article: {text}",
    )
)
register(
    Task(
        name="lamp-5",
        lamp_name="LaMP_5",
        description="Scholarly title generation.",
        item_fields=("title", "abstract"),
        doc_fields=("title", "abstract"),
        rag_template='"{title}" is a title for "{abstract}"',
        trunc_field="abstract",
        rag_suffix=". Following the given patterns {input}",
        query_marker="paper:",
        metrics=("rouge-1", "rouge-l"),
        output_field="title",
        input_template="Generate a title for the following abstract of a paper: {abstract}",
    )
)
register(
    Task(
        name="lamp-6",
        lamp_name="LaMP_6",
        description="Email subject generation.",
        item_fields=("text", "title"),
        doc_fields=("text",),
        rag_template='"{title}" is the title for "{text}"',
        trunc_field="text",
        query_marker=":",
        metrics=("rouge-1", "rouge-l"),
        output_field="title",
        input_template="Generate a subject for the following email: {text}",
    )
)
register(
    Task(
        name="lamp-7",
        lamp_name="LaMP_7",
        description="Tweet paraphrasing.",
        item_fields=("text",),
        doc_fields=("text",),
        rag_template='"{text}"',
        trunc_field="text",
        rag_suffix=" are written by a person. Following the given patterns {input}",
        query_marker=":",
        metrics=("rouge-1", "rouge-l"),
        input_template="Complete the following tweet: {text}",
    )
)
register(
    Task(
        name="movielens-rating",
        description="MovieLens rating prediction (stands in for LaMP-3).",
        item_fields=("text", "score"),
        doc_fields=("text",),
        rag_template='{score} is the score for "{text}"',
        trunc_field="text",
        query_marker="movie:",
        labels=("1", "2", "3", "4", "5"),
        metrics=("mae", "rmse"),
        output_field="score",
        input_template=(
            "What score would this user give the following movie on a scale of 1 to 5? Just answer with 1, 2, 3, "
            "4, or 5 without further explanation. movie: {text}"
        ),
    )
)
register(
    Task(
        name="reuters-lead",
        description="Reuters C50 opening sentence (stands in for LaMP-4).",
        item_fields=("title", "text"),
        doc_fields=("title", "text"),
        rag_template='"{title}" is the opening sentence for "{text}"',
        trunc_field="text",
        query_marker="article:",
        metrics=("rouge-1", "rouge-l"),
        output_field="title",
        input_template="Write the opening sentence for the following news article: {text}",
    )
)
register(
    _AuthorshipTask(
        name="reuters-authorship",
        description="Reuters C50 authorship choice (stands in for LaMP-1).",
        item_fields=("title", "text"),
        doc_fields=("title", "text"),
        rag_template='"{title}" is the opening sentence for "{text}"',
        trunc_field="text",
        labels=("[1]", "[2]"),
        choice=True,
        metrics=("accuracy", "f1"),
        output_field="title",
        input_template="Continue this article: {text}",
    )
)
