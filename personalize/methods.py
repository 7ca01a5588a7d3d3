"""What a method is, stated once: whether it retrieves, whether it needs an adapter, what it costs, what it falls
back to, how it is drawn. The personalizer, the router, the evaluation runner, the reports and the dashboard read
this registry; the no-model baselines (``personalize.eval.baselines``) register themselves here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    uses_retrieval: bool = False
    uses_adapter: bool = False
    cost_rank: int = 0  # cheapest first: retrieval costs a search, an adapter costs training, storage and memory
    without_adapter: str | None = None  # what runs instead when the user has no adapter yet
    colour: str = "#444444"
    baseline: bool = False  # needs no language model (personalize.eval.baselines)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("none", "the base model, no personalization", colour="#7f7f7f"))
register(Method("rag", "the user's top-k items in the prompt", uses_retrieval=True, cost_rank=1, colour="#1f77b4"))
register(
    Method(
        "peft",
        "the base model with the user's adapter",
        uses_adapter=True,
        cost_rank=2,
        without_adapter="none",
        colour="#ff7f0e",
    )
)
register(
    Method(
        "rag+peft",
        "retrieval and the user's adapter",
        uses_retrieval=True,
        uses_adapter=True,
        cost_rank=3,
        without_adapter="rag",
        colour="#2ca02c",
    )
)

MODEL_METHODS: tuple[str, ...] = tuple(METHODS)  # the four methods the router picks from, cheapest first
ZERO_SHOT = "zero-shot"
register(
    Method(
        ZERO_SHOT,
        "the base model without the task adapter (what none was before task adaptation)",
        cost_rank=-1,
        colour="#bcbd22",
    )
)
SERVED_METHODS: tuple[str, ...] = (*MODEL_METHODS, ZERO_SHOT)  # what generate() and an eval run accept
AUTO = "auto"  # not a method: the router picks one of MODEL_METHODS


DEFAULT_ADAPTER_METHOD = "lora"  # what plain ``peft`` and ``rag+peft`` train and serve
_VARIANT_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#98df8a", "#c5b0d5", "#ffbb78", "#aec7e8")


def adapter_variant(name: str) -> tuple[str, str] | None:
    """``peft:ia3`` -> ('peft', 'ia3'), ``rag+peft:prompt-tuning`` -> ('rag+peft', 'prompt-tuning'); None for a name
    that is no adapter method's variant. The adapter method itself is checked where it is used (the registry in
    ``personalize.adapters.methods``)."""
    base, sep, variant = name.partition(":") if isinstance(name, str) else ("", "", "")
    known = METHODS.get(base)
    return (base, variant) if sep and variant and known is not None and known.uses_adapter else None


def adapter_method_of(name: str) -> str:
    """The adapter method a method serves with: its variant's (``peft:ia3`` -> 'ia3'), else LoRA."""
    variant = adapter_variant(name)
    return variant[1] if variant else DEFAULT_ADAPTER_METHOD


def get_method(name: str) -> Method | None:
    """The method called ``name``; ``peft:<adapter method>`` and ``rag+peft:<adapter method>`` are ``peft`` and
    ``rag+peft`` with that method's adapter (same retrieval, cost rank and fallback; a colour of their own)."""
    method = METHODS.get(name)
    variant = None if method is not None else adapter_variant(name)
    if variant is None:
        return method
    base = METHODS[variant[0]]
    shade = sum(variant[1].encode()) + (0 if base.uses_retrieval else 3)
    return replace(
        base,
        name=name,
        description=f"{base.description}, a {variant[1]} adapter",
        colour=_VARIANT_COLOURS[shade % len(_VARIANT_COLOURS)],
    )


def uses_adapter(name: str) -> bool:
    m = get_method(name)
    return bool(m and m.uses_adapter)


def uses_retrieval(name: str) -> bool:
    m = get_method(name)
    return bool(m and m.uses_retrieval)


def without_adapter(name: str) -> str:
    """The method that runs instead of ``name`` for a user without an adapter (``name`` itself if it needs none)."""
    m = get_method(name)
    return m.without_adapter if m and m.without_adapter else name


def by_cost(names: Iterable[str]) -> list[str]:
    """The router's methods among ``names``, cheapest first (zero-shot is a reference, never routed to)."""
    present = set(names)
    return sorted((n for n in MODEL_METHODS if n in present), key=lambda n: METHODS[n].cost_rank)


def ordered(names: Iterable[str]) -> list[str]:
    """Model methods first, each followed by its adapter-method variants (sorted), then the baselines, in registry
    order; anything unknown after them, sorted."""
    names = set(names)
    out: list[str] = []
    for m in METHODS:
        if m in names:
            out.append(m)
        out += sorted(n for n in names if (v := adapter_variant(n)) is not None and v[0] == m)
    return out + sorted(names - set(out))


def colour(name: str) -> str:
    m = get_method(name)
    return m.colour if m else "#444444"
