"""Per-user data in SQL: users and their profile items, upserted idempotently.

The embedded SQLite database is created and migrated on first use; any other database is migrated with
``personalize db upgrade`` (Alembic), so the library never changes a shared schema behind an operator's back.
"""

from __future__ import annotations

import fcntl
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, delete, event, func, inspect, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from personalize.data.items import ProfileItem, UserInfo
from personalize.data.naming import parse_eval_user_id, validate_user_id
from personalize.data.schema import Adapter, EvalResult, EvalRun, Item, TrainingJob, User, utcnow
from personalize.errors import DatabaseUnavailableError, InvalidInputError, UnknownUserError


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched (0 where the driver does not say). ``Session.execute`` is declared to
    return a ``Result``; for DML it is a ``CursorResult``, which carries ``rowcount``."""
    return cast("CursorResult[Any]", result).rowcount or 0


CHECKOUT_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir() -> Path:
    """The Alembic scripts: the installed package data ``personalize.migrations`` (a wheel, or an editable install's
    mapping to the checkout's ``migrations/``), else the checkout's folder (a source tree on ``PYTHONPATH``)."""
    spec = importlib.util.find_spec("personalize.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return CHECKOUT_MIGRATIONS


@dataclass
class UpsertReport:
    """What an upsert changed; ``changed`` holds the items that must be (re)indexed."""

    user_id: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    data_version: int = 0
    changed: list[ProfileItem] = field(default_factory=list)
    training: str | None = None  # what the upsert did about (re)training the user's adapter, if anything


@dataclass
class DeletedRows:
    items: int = 0
    adapters: int = 0
    jobs: int = 0
    eval_answers: int = 0
    adapter_paths: list[str] = field(default_factory=list)
    scrubbed: bool = True  # SQLite: the WAL was truncated, so no copy of the deleted rows is left in it


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA secure_delete=ON")  # forgotten users' text must not linger in free pages
    cur.close()


def check_database_url(url: object) -> str:
    """Refuse a URL SQLAlchemy cannot parse, or whose driver is not installed, with one line naming the setting."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    where = "the database URL (PERSONALIZE_DATABASE_URL)"
    if not isinstance(url, str):
        raise InvalidInputError(f"{where} must be a string, got {type(url).__name__}")
    try:
        make_url(url).get_dialect()
    except NoSuchModuleError:
        raise InvalidInputError(f"{where} {redact_url(url)!r} names an unknown database dialect") from None
    except (ArgumentError, ValueError) as exc:
        reason = "not a SQLAlchemy URL" if isinstance(exc, ArgumentError) else _first_line(exc)
        raise InvalidInputError(f"{where} {redact_url(url)!r} is unusable: {reason}") from None
    return url


def make_engine(url: str) -> Engine:
    check_database_url(url)
    try:
        return _make_engine(url)
    except ImportError as exc:  # a dialect whose DBAPI driver is not installed, e.g. mysql:// without mysqlclient
        raise InvalidInputError(
            f"the database URL (PERSONALIZE_DATABASE_URL) {redact_url(url)!r} needs a driver that is not installed "
            f"({exc.name or exc})"
        ) from None
    except OSError as exc:  # the SQLite file's folder cannot be created
        raise InvalidInputError(
            f"the database URL (PERSONALIZE_DATABASE_URL) {redact_url(url)!r}: cannot create its folder "
            f"({exc.strerror or exc})"
        ) from None


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, or None (another database, or SQLite in memory)."""
    path = url.split("///", 1)[-1]
    return Path(path) if url.startswith("sqlite") and path and path != ":memory:" else None


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        if (file := _sqlite_file(url)) is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade_database(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations in ``migrations/`` against ``url``; a bad URL or a server that is down is one
    ``PersonalizeError``, not a traceback."""
    from alembic import command
    from alembic.config import Config

    make_engine(url).dispose()  # refuses a garbage URL or a missing driver before Alembic sees it
    if (file := _sqlite_file(url)) is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["skip_logging"] = True
    try:
        command.upgrade(cfg, revision)
    except OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot reach database {redact_url(url)}: {type(exc.orig).__name__}: {_first_line(exc.orig)}"
        ) from None


def _first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip().splitlines()
    return text[0][:300] if text else ""


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    file = _sqlite_file(url)
    if file is None:
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{file}.migrate.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Store:
    """SQL access for users and items. Thread-safe; one per process is enough."""

    def __init__(self, url: str, auto_migrate: bool | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if auto_migrate is None:
            auto_migrate = url.startswith("sqlite")
        self._auto_migrate = auto_migrate
        self._ready = False

    def _ensure_schema(self) -> None:
        if self._ready:
            return
        try:
            if self._auto_migrate:
                with _migration_lock(self.url):  # two processes creating one SQLite file must not race
                    upgrade_database(self.url)
            elif not inspect(self.engine).has_table("users"):
                raise DatabaseUnavailableError(
                    f"database {redact_url(self.url)} has no personalize schema: run `personalize db upgrade`"
                )
        except OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot reach database {redact_url(self.url)}: {type(exc.orig).__name__}: {_first_line(exc.orig)}"
            ) from None
        self._ready = True

    @contextmanager
    def session(self) -> Iterator[Session]:
        self._ensure_schema()
        try:
            with self._sessions() as session, session.begin():
                yield session
        except OperationalError as exc:
            raise DatabaseUnavailableError(
                f"database {redact_url(self.url)} is unavailable ({type(exc.orig).__name__}); retry when it is back"
            ) from None
        except StatementError as exc:  # a value the backend refuses; SQLAlchemy's message would print the row
            if isinstance(exc, DBAPIError) and not isinstance(exc, DataError):
                raise  # IntegrityError (a concurrent writer: upsert_items retries) and server-side faults
            raise InvalidInputError(
                f"database {redact_url(self.url)} refused the write ({type(exc.orig).__name__}: "
                f"{_first_line(exc.orig)}); nothing of it was stored"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    # -- users -------------------------------------------------------------------------------------------------

    def _user(self, session: Session, user_id: str) -> User:
        user = session.scalar(select(User).where(User.external_id == user_id))
        if user is None:
            raise UnknownUserError(user_id)
        return user

    def add_user(self, user_id: str) -> bool:
        """Create the user if absent; return whether it was created."""
        validate_user_id(user_id)
        try:
            with self.session() as s:
                if s.scalar(select(User.id).where(User.external_id == user_id)) is not None:
                    return False
                s.add(User(external_id=user_id))
            return True
        except IntegrityError:
            return False

    def get_user(self, user_id: str) -> UserInfo:
        validate_user_id(user_id)
        with self.session() as s:
            return self.user_info(s, self._user(s, user_id))

    @staticmethod
    def user_info(session: Session, user: User) -> UserInfo:
        """A user row as ``UserInfo``: its item count and tasks in one grouped query."""
        counts = session.execute(
            select(Item.task, func.count(Item.id)).where(Item.user_pk == user.id).group_by(Item.task)
        ).all()
        return UserInfo(
            user.external_id,
            sum(int(n) for _, n in counts),
            user.data_version,
            user.created_at,
            user.updated_at,
            sorted(task for task, _ in counts if task),
        )

    def has_user(self, user_id: str) -> bool:
        with self.session() as s:
            return s.scalar(select(User.id).where(User.external_id == user_id)) is not None

    def list_users(self, search: str | None = None, limit: int = 100, offset: int = 0) -> list[UserInfo]:
        with self.session() as s:
            counts = select(Item.user_pk, func.count(Item.id).label("n")).group_by(Item.user_pk).subquery()
            query = (
                select(User, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.user_pk == User.id)
                .order_by(User.external_id)
                .limit(limit)
                .offset(offset)
            )
            if search:
                query = query.where(User.external_id.contains(search, autoescape=True))
            return [
                UserInfo(u.external_id, int(n), u.data_version, u.created_at, u.updated_at)
                for u, n in s.execute(query).all()
            ]

    def count_users(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count(User.id))) or 0

    def count_items(self, user_id: str | None = None) -> int:
        with self.session() as s:
            query = select(func.count(Item.id))
            if user_id is not None:
                query = query.where(Item.user_pk == self._user(s, user_id).id)
            return s.scalar(query) or 0

    # -- items -------------------------------------------------------------------------------------------------

    def upsert_items(
        self, user_id: str, items: Sequence[ProfileItem], before_commit=None, retries: int = 3
    ) -> UpsertReport:
        """Insert or update items by id in one transaction; identical items change nothing.

        ``before_commit(report)`` runs inside the transaction (used to index the changed items), so a failure
        there rolls the SQL side back and nothing is half-stored.
        """
        validate_user_id(user_id)
        seen: dict[str, ProfileItem] = {}
        for item in items:
            seen[item.id] = item  # the last copy of a duplicated id wins, as an upsert would
        for attempt in range(retries):
            try:
                return self._upsert_once(user_id, list(seen.values()), before_commit)
            except IntegrityError:  # another process created the same user or item concurrently
                if attempt == retries - 1:
                    raise
        raise AssertionError("unreachable")

    def upsert_many(
        self, batches: Sequence[tuple[str, Sequence[ProfileItem], Any]], retries: int = 3
    ) -> list[UpsertReport]:
        """``upsert_items`` for several users in ONE transaction (a file's import): a failure anywhere, in SQL or in
        a ``before_commit`` hook, rolls every user back, so the file is stored whole or not at all."""
        prepared = []
        for user_id, items, before_commit in batches:
            validate_user_id(user_id)
            prepared.append((user_id, list({i.id: i for i in items}.values()), before_commit))
        for attempt in range(retries):
            try:
                with self.session() as s:
                    return [self._upsert_in(s, u, items, hook) for u, items, hook in prepared]
            except IntegrityError:  # another process created the same user or item concurrently
                if attempt == retries - 1:
                    raise
        raise AssertionError("unreachable")

    def _upsert_once(self, user_id: str, items: list[ProfileItem], before_commit) -> UpsertReport:
        with self.session() as s:
            return self._upsert_in(s, user_id, items, before_commit)

    def _upsert_in(self, s: Session, user_id: str, items: list[ProfileItem], before_commit) -> UpsertReport:
        report = UpsertReport(user_id)
        user = s.scalar(select(User).where(User.external_id == user_id))
        if user is None:
            user = User(external_id=user_id)
            s.add(user)
            s.flush()
        existing: dict[str, Item] = {}
        ids = [i.id for i in items]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for found in s.scalars(select(Item).where(Item.user_pk == user.id, Item.item_id.in_(chunk))):
                existing[found.item_id] = found
        now = utcnow()
        for item in items:
            digest = item.content_hash()
            row = existing.get(item.id)
            if row is not None and row.content_hash == digest:
                report.unchanged += 1
                continue
            if row is None:
                s.add(
                    Item(
                        user_pk=user.id,
                        item_id=item.id,
                        task=item.task,
                        text=item.text,
                        fields=item.fields,
                        output=item.output,
                        timestamp=item.timestamp,
                        content_hash=digest,
                        created_at=now,
                        updated_at=now,
                    )
                )
                report.added += 1
            else:
                row.task, row.text, row.fields = item.task, item.text, item.fields
                row.output, row.timestamp, row.content_hash = item.output, item.timestamp, digest
                row.updated_at = now
                report.updated += 1
            report.changed.append(item)
        if report.changed:
            user.data_version += 1
            user.updated_at = now
        s.flush()
        report.data_version = user.data_version
        if before_commit is not None and report.changed:
            before_commit(report)
        return report

    def item_hashes(self, user_id: str, ids: Sequence[str] | None = None) -> dict[str, str]:
        """Content hashes of the given items that are stored, or of all the user's items (``ids`` None); an unknown
        user has none."""
        out: dict[str, str] = {}
        with self.session() as s:
            if ids is None:  # one round trip: a retriever checks this on every search
                query = select(Item.item_id, Item.content_hash).join(User, Item.user_pk == User.id)
                return dict(s.execute(query.where(User.external_id == user_id)).tuples().all())
            user_pk = s.scalar(select(User.id).where(User.external_id == user_id))
            if user_pk is None:
                return out
            for start in range(0, len(ids), 500):
                query = select(Item.item_id, Item.content_hash).where(
                    Item.user_pk == user_pk, Item.item_id.in_(list(ids[start : start + 500]))
                )
                out.update(dict(s.execute(query).tuples().all()))
        return out

    def items(self, user_id: str, ids: Sequence[str] | None = None) -> list[ProfileItem]:
        """The user's items in time order (items without a timestamp last, then by insertion)."""
        with self.session() as s:
            if ids is None:
                query = select(Item).where(Item.user_pk == self._user(s, user_id).id)
            else:  # one round trip (retrieval's hits): an unknown user simply has none of them
                query = select(Item).join(User, Item.user_pk == User.id)
                query = query.where(User.external_id == user_id, Item.item_id.in_(list(ids)))
            rows = s.scalars(query.order_by(Item.timestamp.is_(None), Item.timestamp, Item.id)).all()
            return [ProfileItem(r.item_id, r.text, r.fields, r.output, r.timestamp, r.task) for r in rows]

    def data_version(self, user_id: str) -> int:
        with self.session() as s:
            return self._user(s, user_id).data_version

    def delete_user(self, user_id: str) -> DeletedRows:
        """Delete the user and every row that belongs to them; return what was removed."""
        with self.session() as s:
            user = self._user(s, user_id)
            out = DeletedRows()
            out.adapter_paths = list(s.scalars(select(Adapter.path).where(Adapter.user_pk == user.id)))
            out.items = rowcount(s.execute(delete(Item).where(Item.user_pk == user.id)))
            out.jobs = rowcount(s.execute(delete(TrainingJob).where(TrainingJob.user_pk == user.id)))
            out.adapters = rowcount(s.execute(delete(Adapter).where(Adapter.user_pk == user.id)))
            s.execute(delete(User).where(User.id == user.id))
            out.eval_answers = self._delete_eval_answers(s, user_id)
        out.scrubbed = self.scrub_wal()
        return out

    @staticmethod
    def _delete_eval_answers(s: Session, user_id: str) -> int:
        """An evaluation user's stored answers (prediction and gold per query) go with them: runs keep the rest."""
        parsed = parse_eval_user_id(user_id)
        if parsed is None:
            return 0
        task, split, user = parsed
        runs = select(EvalRun.id).where(EvalRun.task == task, EvalRun.split == split)
        query = delete(EvalResult).where(EvalResult.user_external_id == user, EvalResult.run_id.in_(runs))
        return rowcount(s.execute(query.execution_options(synchronize_session=False)))

    def scrub_wal(self) -> bool:
        """Copy SQLite's WAL into the database and truncate it to zero bytes; False when a reader kept it busy.

        ``secure_delete`` zeroes deleted rows in the database file, but the WAL still holds the pages as they were
        before the delete (the rows as inserted) until it is truncated, and it is only removed when the last
        connection of every process closes. Readers are waited for (``busy_timeout``). Other databases: True.
        """
        if not self.url.startswith("sqlite"):
            return True
        self._ensure_schema()
        with self.engine.connect() as conn:
            busy, _log, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        return busy == 0
