"""The worker's hot commands on a bare socket: hiredis packs and parses, nothing else runs.

A worker's task steps are single EVALSHA calls (create, finish, finish-and-pop, pop). Through
redis-py each costs ~24 us of client CPU (connection lock, argument normalisation, the retry
wrapper, response callbacks); on one socket with ``hiredis.pack_command`` and ``hiredis.Reader`` it
costs ~10 us. This module is only that: one connection (TCP, optionally TLS, AUTH and SELECT as
the config says) that sends one command and reads one reply.

What is kept from the redis-py path: the same ``OutageRetry`` (transient errors are retried with
backoff for ``outage_timeout`` seconds and counted as the client's outage; every script it runs
recognises a re-sent call), the same error classes (``NoScriptError``, ``ResponseError``,
``ConnectionError``, ``TimeoutError``), the same timeouts and TLS checks (host name verified). A
connection that failed is dropped and opened again on the next attempt; a forked child opens its own.

Not used on a Redis Cluster (redis-py routes those), without hiredis, or with
``RUSH_HPC_FAST_PATH=0``.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import Any

import redis

from .config import RedisConfig
from .outage import OutageRetry

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    hiredis = None  # type: ignore[assignment]

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def available(config: RedisConfig) -> bool:
    """Whether the fast path can serve this config (else the caller keeps redis-py)."""
    return hiredis is not None and not config.cluster and os.environ.get("RUSH_HPC_FAST_PATH", "1") != "0"


def _error(message: str) -> redis.RedisError:
    """A server error reply as an exception: ``NoScriptError`` (the caller loads the script), else
    ``ResponseError``, which ``OutageRetry`` retries only for the replies of a busy or restarting
    server. (Not redis-py's ``AuthenticationError`` for a refused password: it is a
    ``ConnectionError``, and a wrong password would be retried as an outage.)"""
    if message.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(message)
    return redis.ResponseError(message)


class FastConnection:
    """One connection for one thread at a time (a lock guards it: the worker's loop is its user)."""

    def __init__(self, config: RedisConfig, retry: OutageRetry) -> None:
        self.config = config
        self.retry = retry
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    # -- connecting --------------------------------------------------------------------------
    def _connect(self) -> None:
        config = self.config
        try:
            sock = socket.create_connection((config.host, config.port), timeout=config.socket_connect_timeout)
        except socket.timeout as error:
            raise redis.TimeoutError(f"connecting to {config.host}:{config.port}: {error}") from None
        except OSError as error:
            raise redis.ConnectionError(f"connecting to {config.host}:{config.port}: {error}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if config.ssl:
                sock = self._wrap_tls(sock)
            sock.settimeout(config.socket_timeout)
            self._sock, self._reader, self._pid = sock, hiredis.Reader(), os.getpid()
            if config.password is not None:
                auth = ("AUTH", config.username, config.password) if config.username else ("AUTH", config.password)
                self._roundtrip(auth)
            if config.db:
                self._roundtrip(("SELECT", config.db))
        except BaseException:
            self.close()
            sock.close()
            raise

    def _wrap_tls(self, sock: socket.socket) -> socket.socket:
        config = self.config
        context = ssl.create_default_context(cafile=config.ssl_ca_certs)
        reqs = _CERT_REQS.get(config.ssl_cert_reqs, ssl.CERT_REQUIRED)
        context.check_hostname = reqs != ssl.CERT_NONE  # as RedisConfig.client: names checked
        context.verify_mode = reqs
        if config.ssl_certfile:
            context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
        try:
            return context.wrap_socket(sock, server_hostname=config.host)
        except (ssl.SSLError, OSError) as error:
            raise redis.ConnectionError(f"TLS with {config.host}:{config.port}: {error}") from None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # -- one command -------------------------------------------------------------------------
    def _roundtrip(self, args: tuple[Any, ...]) -> Any:
        sock, reader = self._sock, self._reader
        assert sock is not None
        try:
            sock.sendall(hiredis.pack_command(args))
            reply = reader.gets()
            while reply is False:
                data = sock.recv(65536)
                if not data:
                    raise redis.ConnectionError("Redis closed the connection")
                reader.feed(data)
                reply = reader.gets()
        except socket.timeout as error:
            self.close()
            raise redis.TimeoutError(f"no reply within {self.config.socket_timeout} s: {error}") from None
        except OSError as error:
            self.close()
            raise redis.ConnectionError(str(error)) from None
        except redis.ConnectionError:
            self.close()
            raise
        except hiredis.ProtocolError as error:
            self.close()
            raise redis.ConnectionError(f"protocol error: {error}") from None
        if isinstance(reply, hiredis.ReplyError):
            raise _error(str(reply))
        return reply

    def _attempt(self, args: tuple[Any, ...]) -> Any:
        if self._sock is None or self._pid != os.getpid():
            self._sock = None  # a forked child never writes into its parent's connection
            self._connect()
        return self._roundtrip(args)

    def execute(self, *args: Any) -> Any:
        """Send one command, return its reply (bytes, ints, lists as hiredis parses them)."""
        with self._lock:
            return self.retry.call_with_retry(lambda: self._attempt(args), lambda error: self.close())
