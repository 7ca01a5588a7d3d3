"""Users: search, a user's items, adapter versions and training history, and the four methods side by side."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data, ui
from personalize.errors import BrokerUnavailableError, PersonalizeError
from personalize.methods import MODEL_METHODS
from personalize.personalizer import METHODS
from personalize.results import GenerationResult
from personalize.retrieval import RETRIEVERS
from personalize.tasks.registry import task_names

ANSWERS = "users_answers"


def users_frame(users: list, synthetic: set[str]) -> pd.DataFrame:
    return pd.DataFrame.from_records(
        [
            {
                "user": u.user_id,
                "items": u.n_items,
                "data version": u.data_version,
                "updated": u.updated_at,
                "data": ui.SYNTHETIC if u.user_id in synthetic else "",
            }
            for u in users
        ]
    )


def retrievers_frame() -> pd.DataFrame:
    """The registered retrievers (``personalize.retrieval.RETRIEVERS``), in registration order."""
    return pd.DataFrame.from_records(
        [{"retriever": spec.name, "description": spec.description} for spec in RETRIEVERS.values()],
        columns=["retriever", "description"],
    )


def items_frame(items: list) -> pd.DataFrame:
    return pd.DataFrame.from_records(
        [
            {"id": i.id, "timestamp": i.timestamp, "task": i.task, "text": i.text, "output": i.output}
            for i in reversed(items)
        ]
    )


def adapters_frame(adapters: list) -> pd.DataFrame:
    return pd.DataFrame.from_records(
        [
            {
                "version": a.version,
                "data version": a.data_version,
                "items": a.n_items,
                "final loss": a.final_loss,
                "train s": a.train_seconds,
                "MB": a.size_bytes / 1e6,
                "base model": a.base_model,
                "created": a.created_at,
                "path": a.path,
            }
            for a in reversed(adapters)
        ]
    )


def show_answer(result: GenerationResult | str, method: str, items_by_id: dict) -> None:
    with st.container(border=True):
        st.markdown(f"#### {method}")
        if isinstance(result, str):
            st.error(result)
            return
        if result.method != method:
            st.caption(f"ran as **{result.method}**")
        st.markdown(result.text or "_(empty answer)_")
        t = result.timings
        st.caption(
            f"retrieval {t.retrieval_s * 1000:.0f} ms · prompt {t.prompt_s * 1000:.0f} ms · "
            f"generation {t.generation_s * 1000:.0f} ms · total {t.total_s * 1000:.0f} ms · "
            f"{result.prompt_tokens} prompt + {result.new_tokens} new tokens"
        )
        if result.retrieved:
            st.dataframe(
                pd.DataFrame.from_records(
                    [
                        {
                            "id": r.id,
                            "score": r.score,
                            "text": items_by_id[r.id].text if r.id in items_by_id else "",
                        }
                        for r in result.retrieved
                    ]
                ),
                hide_index=True,
                width="stretch",
            )
        for note in result.notes:
            st.caption(f"note: {note}")


with ui.page("Users", "Per-user data, adapters and training; try a prompt with every method"):
    if data.count_users() == 0:
        st.info("No users in this database yet.", icon=":material/info:")
        st.markdown(ui.LOAD_DATA_HELP)
        st.stop()
    cols = st.columns([3, 1])
    search = cols[0].text_input("Search users (part of the id)", key="users_search")
    limit = cols[1].number_input("Show at most", min_value=10, max_value=10_000, value=200, step=50, key="users_limit")
    users = data.users(search, int(limit))
    synthetic = data.synthetic_users()
    if not users:
        st.info(f"No user id contains {search!r}.")
        st.stop()
    st.dataframe(users_frame(users, synthetic), hide_index=True, width="stretch")

    user_id = st.selectbox("User", [u.user_id for u in users], key="users_pick")
    info, items, adapters, jobs = data.user_detail(user_id)
    if user_id in synthetic:
        st.warning(
            f"{user_id} was ingested for a **{ui.SYNTHETIC}** run: planted signals, not real data.",
            icon=":material/science:",
        )
    m = st.columns(4)
    m[0].metric("Items", info.n_items)
    m[1].metric("Data version", info.data_version)
    m[2].metric("Adapter versions", len(adapters))
    m[3].metric("Training jobs", len(jobs))
    st.caption(f"tasks: {', '.join(info.tasks) or 'none given'} · created {info.created_at:%Y-%m-%d %H:%M}")

    tab_items, tab_adapters, tab_jobs = st.tabs(["Items", "Adapter versions", "Training history"])
    with tab_items:
        st.dataframe(items_frame(items), hide_index=True, width="stretch")
    with tab_adapters:
        if adapters:
            st.dataframe(adapters_frame(adapters), hide_index=True, width="stretch")
        else:
            st.caption("No adapter yet.")
        if st.button("Queue training", key="users_train", help="Queue this user's adapter for the workers"):
            try:
                st.success(data.personalizer().enqueue_training(user_id).message)
                data.clear()
            except BrokerUnavailableError as exc:
                st.error(f"**The broker is unreachable.** {exc}", icon=":material/error:")
            except PersonalizeError as exc:
                st.error(str(exc))
    with tab_jobs:
        if jobs:
            st.dataframe(
                ui.jobs_frame(jobs).drop(columns=["user"]),
                hide_index=True,
                width="stretch",
                column_config={"progress": ui.PROGRESS_COLUMN},
            )
        else:
            st.caption("No training jobs.")

    st.subheader("Try a prompt")
    settings = data.personalizer().settings
    retrievers = list(RETRIEVERS)
    with st.expander(f"Registered retrievers ({len(retrievers)})"):
        st.dataframe(retrievers_frame(), hide_index=True, width="stretch")
    with st.form("users_prompt"):
        prompt = st.text_area("Prompt", key="users_prompt_text")
        cols = st.columns([2, 1, 1, 1, 1])
        methods = cols[0].multiselect(
            "Methods", [m for m in METHODS if m != "auto"], default=list(MODEL_METHODS), key="users_methods"
        )
        k = cols[1].number_input("k (retrieved items)", 0, 100, settings.k, key="users_k")
        max_new = cols[2].number_input("Max new tokens", 1, 1024, min(settings.max_new_tokens, 32), key="users_new")
        default = retrievers.index(settings.retriever) if settings.retriever in retrievers else 0
        retriever = cols[3].selectbox(
            "Retriever",
            retrievers,
            default,
            key="users_ret",
            help="  \n".join(f"**{spec.name}**: {spec.description}" for spec in RETRIEVERS.values()),
        )
        task = cols[4].selectbox("Task", ["(from the user's items)", *task_names()], key="users_task")
        submitted = st.form_submit_button("Answer with each method", type="primary")
    if submitted:
        p = data.personalizer()
        with st.spinner("Loading the model and answering ..."):
            data.model()
            answers: dict[str, GenerationResult | str] = {}
            for method in methods:
                try:
                    answers[method] = p.generate(
                        user_id,
                        prompt,
                        method,
                        k=int(k),
                        max_new_tokens=int(max_new),
                        retriever=retriever,
                        task=None if task.startswith("(") else task,
                    )
                except PersonalizeError as exc:
                    answers[method] = str(exc)
        st.session_state[ANSWERS] = (user_id, prompt, answers)
    saved = st.session_state.get(ANSWERS)
    if saved and saved[0] == user_id:
        _, asked, answers = saved
        st.caption(f"Answers for {user_id!r} to: {asked}")
        items_by_id = {i.id: i for i in items}
        for col, (method, result) in zip(st.columns(len(answers) or 1), answers.items(), strict=False):
            with col:
                show_answer(result, method, items_by_id)
