"""How to reach Redis: ``RedisConfig``, built from a URL, keyword arguments or the environment.

The password never leaves this object in clear text unless a caller asks for it explicitly
(``to_url(show_secrets=True)``, ``to_dict()`` for a worker's credentials file): ``repr``, ``str``
and every error message show ``***`` instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from .exceptions import ConfigError

REDACTED = "***"
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """Connection settings of one Redis database.

    ``ssl=True`` (or a ``rediss://`` URL) turns on TLS; ``ssl_ca_certs`` names the CA that signed the
    server certificate, ``ssl_certfile``/``ssl_keyfile`` a client certificate for mutual TLS, and
    ``ssl_cert_reqs="none"`` skips verification (not recommended). The server certificate must name
    ``host`` (host name checking is always on while certificates are verified).
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    socket_timeout: float | None = 60.0
    socket_connect_timeout: float = 5.0
    #: how long every client retries through a Redis outage (restart, network blip) before giving up
    outage_timeout: float = 60.0
    #: a Redis Cluster (``redis+cluster://`` URL): any node's address; redis-py's RedisCluster routes
    cluster: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"Redis port must be an integer in 1..65535, got {self.port!r}")
        if self.ssl_cert_reqs not in ("required", "optional", "none"):
            raise ConfigError("ssl_cert_reqs must be 'required', 'optional' or 'none', "
                              f"got {self.ssl_cert_reqs!r}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RedisConfig:
        """Parse ``redis://[[user]:password@]host[:port][/db][?ssl_ca_certs=...]`` or ``rediss://...``."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            raise ConfigError(f"Redis URL must start with redis://, rediss:// (TLS), redis+cluster:// or "
                              f"rediss+cluster:// (Redis Cluster), got "
                              f"{redact_url(url)!r} (example: redis://:password@127.0.0.1:6379/0)")
        try:
            port = parts.port or 6379
        except ValueError as error:
            raise ConfigError(f"invalid port in Redis URL {redact_url(url)!r}: {error}") from None
        path = parts.path.lstrip("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if "db" in query:
            path = query.pop("db")
        try:
            db = int(path) if path else 0
        except ValueError:
            raise ConfigError(f"database in Redis URL must be a number, got {path!r}") from None
        unknown = set(query) - set(_TLS_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown Redis URL option(s) {sorted(unknown)}; valid: {list(_TLS_OPTIONS)}")
        values: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": port,
            "db": db,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
            "ssl": parts.scheme.startswith("rediss"),
            "cluster": parts.scheme.endswith("+cluster"),
            **query,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RedisConfig | None:
        """``RUSH_HPC_URL`` (or ``REDIS_URL``), with ``RUSH_HPC_REDIS_PASSWORD`` overriding the password."""
        env = os.environ if environ is None else environ
        url = env.get("RUSH_HPC_URL") or env.get("REDIS_URL")
        if not url:
            return None
        config = cls.from_url(url)
        if env.get("RUSH_HPC_REDIS_PASSWORD"):
            config = dataclasses.replace(config, password=env["RUSH_HPC_REDIS_PASSWORD"])
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RedisConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Everything, the password included: only for a worker's 0600 credentials file."""
        return dataclasses.asdict(self)

    # -- presentation ------------------------------------------------------------------------
    def to_url(self, show_secrets: bool = False) -> str:
        scheme = ("rediss" if self.ssl else "redis") + ("+cluster" if self.cluster else "")
        auth = ""
        if self.username or self.password is not None:
            password = quote(self.password or "", safe="") if show_secrets else REDACTED
            user = quote(self.username or "", safe="")
            auth = f"{user}:{password}@" if self.password is not None else f"{user}@"
        query = {k: getattr(self, k) for k in _TLS_OPTIONS
                 if getattr(self, k) and not (k == "ssl_cert_reqs" and self.ssl_cert_reqs == "required")}
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"{scheme}://{auth}{host}:{self.port}/{self.db}"
        return f"{url}?{urlencode(query)}" if query else url

    def __str__(self) -> str:
        return self.to_url()

    # -- connecting --------------------------------------------------------------------------
    def client(self, *, socket_timeout: float | None | str = "default", decode_responses: bool = False,
               outage_timeout: float | None = None, single_connection: bool = False):
        """A redis-py client that retries transient errors with backoff for up to ``outage_timeout``
        seconds (default: the config's), so that a Redis restart does not end a worker.

        ``single_connection``: one dedicated connection behind a lock instead of a pool (a worker's
        hot path: no pool checkout and release per command).
        """
        import redis

        from .outage import OutageRetry

        kwargs: dict[str, Any] = {}
        if self.cluster:
            return self._cluster_client(socket_timeout, decode_responses)
        if self.ssl:
            # host name checking explicitly on: redis-py's default changed between versions (5.x
            # accepted a certificate issued for another host); off only with verification off
            kwargs.update(ssl=True, ssl_cert_reqs=self.ssl_cert_reqs, ssl_ca_certs=self.ssl_ca_certs,
                          ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                          ssl_check_hostname=self.ssl_cert_reqs != "none")
        return redis.Redis(
            host=self.host, port=self.port, db=self.db, username=self.username,
            password=self.password,
            socket_timeout=self.socket_timeout if isinstance(socket_timeout, str) else socket_timeout,
            socket_connect_timeout=self.socket_connect_timeout,
            retry=OutageRetry(self.outage_timeout if outage_timeout is None else outage_timeout,
                              label=f"Redis at {self}"),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.ResponseError],
            health_check_interval=30, decode_responses=decode_responses,
            single_connection_client=single_connection, **kwargs,
        )


    def _cluster_client(self, socket_timeout: float | None | str, decode_responses: bool):
        """A RedisCluster client; it finds every master from this one node and routes each network's
        keys (one hash slot per network) to its master. redis-py retries cluster errors itself."""
        from redis.cluster import RedisCluster

        kwargs: dict[str, Any] = {}
        if self.ssl:  # host name checking explicitly on, as for a single server
            kwargs.update(ssl=True, ssl_cert_reqs=self.ssl_cert_reqs, ssl_ca_certs=self.ssl_ca_certs,
                          ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                          ssl_check_hostname=self.ssl_cert_reqs != "none")
        return RedisCluster(
            host=self.host, port=self.port, username=self.username, password=self.password,
            socket_timeout=self.socket_timeout if isinstance(socket_timeout, str) else socket_timeout,
            socket_connect_timeout=self.socket_connect_timeout, decode_responses=decode_responses, **kwargs)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return url.replace(parts.netloc, f"{user}:{REDACTED}@{netloc[-1]}", 1)


def resolve_config(url: str | None = None, config: RedisConfig | None = None) -> RedisConfig | None:
    """``config``, else ``url``, else the environment; None means "start an embedded Redis"."""
    if config is not None and url is not None:
        raise ConfigError("give either url= or config=, not both")
    if config is not None:
        return config
    if url is not None:
        return RedisConfig.from_url(url)
    return RedisConfig.from_env()
