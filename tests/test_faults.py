"""Faults: the database unreachable for a moment, then back, without restarting the client."""

import contextlib
import socket
import threading

import pytest

from personalize import Personalizer, Settings
from personalize.data.store import upgrade_database
from personalize.errors import DatabaseUnavailableError


class TcpProxy:
    """A tiny localhost TCP forwarder that can drop every connection and refuse new ones, then come back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        self.up = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def down(self) -> None:
        self.up = False
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass
        self.conns.clear()

    def restore(self) -> None:
        self.up = True


@pytest.mark.postgres
def test_database_outage_gives_a_clear_error_then_recovers(postgres_url, tiny_model_dir, tmp_path):
    upgrade_database(postgres_url)
    proxy = TcpProxy(("127.0.0.1", 5432))
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = Settings(
        home=tmp_path / "home", database_url=url, model=str(tiny_model_dir), auto_train=False, _env_file=None
    )
    with Personalizer(settings) as p:
        p.add_items("alice", [{"id": "1", "text": "hello there"}])
        assert p.generate("alice", "hi", method="rag", max_new_tokens=2).method == "rag"
        proxy.down()
        with pytest.raises(DatabaseUnavailableError) as err:
            p.generate("alice", "hi", method="rag", max_new_tokens=2)
        assert "unavailable" in str(err.value) or "cannot reach" in str(err.value)
        proxy.restore()
        result = p.generate("alice", "hi", method="rag", max_new_tokens=2)  # same client, no restart
        assert result.method == "rag" and result.retrieved_ids == ["1"]
