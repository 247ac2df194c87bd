"""Fault injection for tests: a TCP proxy in front of Redis that drops replies or the whole link.

``DroppingProxy`` forwards a client's connections to Redis on loopback.
* ``drop_next_reply()`` arms it: the next reply Redis sends is swallowed and the client's connection
  is closed, as when a network drops a reply after the server executed the command. redis-py then
  reconnects and re-sends the command (its retry), which is what rush-hpc's scripts must survive.
* ``pattern = b"..."``: the same, for the reply to the next request that contains ``pattern``.
* ``down = True``: a dead link: bytes in both directions are swallowed, connections stay open.
* ``mute = True``: only replies are swallowed (requests get through and run), connections stay open.
* ``accepted`` counts the connections, so a test can act right after one opens.
"""

from __future__ import annotations

import socket
import threading


class DroppingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._armed = threading.Event()
        self.dropped = 0
        self.pattern: bytes | None = None
        self.down = False
        self.mute = False  # replies swallowed, the connection kept open (a reply lost on its way)
        self.accepted = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next_reply(self) -> None:
        self._armed.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not replies and self.pattern is not None and self.pattern in data:
                    self.pattern = None
                    self._armed.set()
                if self.down or (replies and self.mute):
                    continue  # a dead link (or muted replies): nothing arrives, nothing is closed
                if replies and self._armed.is_set():
                    self._armed.clear()
                    self.dropped += 1
                    break  # swallow the reply and cut this connection
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
