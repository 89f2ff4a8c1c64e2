"""A TCP proxy on 127.0.0.1 that can freeze: it stops forwarding bytes, closing nothing.

What a hung load balancer, proxy or half-dead NAT looks like to a client: the
connection stays open, the kernel keeps acknowledging what the client sends (so TCP
keepalives and ``tcp_user_timeout`` see a healthy peer), and no answer ever comes.
New connections are still accepted while frozen, and never forwarded either.

    with FrozenProxy(upstream_host, upstream_port) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        ...
        proxy.freeze()
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType


class FrozenProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` until :meth:`freeze` is called."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._frozen = threading.Event()
        self._replies_frozen = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def freeze(self) -> None:
        """Stop forwarding in both directions; every socket stays open."""
        self._frozen.set()

    def freeze_replies(self) -> None:
        """Keep forwarding what clients send, but nothing the server answers.

        A statement then runs (and commits) on the server while its client never
        hears so: the outcome the client sees is unknown.
        """
        self._replies_frozen.set()

    def close(self) -> None:
        """Close every socket (the clients then see the connection end)."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> FrozenProxy:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            if self._frozen.is_set():
                continue  # accepted by the kernel, never answered
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(server)
            for source, target, reply in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, target, reply), daemon=True
                ).start()

    def _stopped(self, reply: bool) -> bool:
        return self._frozen.is_set() or (reply and self._replies_frozen.is_set())

    def _pump(self, source: socket.socket, target: socket.socket, reply: bool) -> None:
        while not self._closed.is_set():
            if self._stopped(reply):
                self._closed.wait(0.05)  # leave the bytes in the kernel's buffers
                continue
            try:
                readable, _, _ = select.select([source], [], [], 0.05)
                if not readable or self._stopped(reply):
                    continue
                data = source.recv(65536)
            except (OSError, ValueError):
                return
            if not data:
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_WR)
                return
            try:
                target.sendall(data)
            except OSError:
                return
