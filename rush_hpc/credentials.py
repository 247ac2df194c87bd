"""The two secrets a worker needs (Redis password, signing secret) and how they travel.

They never go on a command line, into a job script or a log: a launcher writes them to a
credentials file with mode 0600 (locally, on a shared path, or uploaded over SFTP) and the worker
finds the file through the ``RUSH_HPC_CREDENTIALS`` environment variable.

The signing secret comes from, in order: ``secret=``, ``RUSH_HPC_SECRET``, the file named by
``RUSH_HPC_SECRET_FILE``, or ``~/.config/rush-hpc/secret`` (created with mode 0600 when missing, so
that a controller and in-process workers of one user agree without configuration).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Mapping

from .config import RedisConfig
from .exceptions import ConfigError

CREDENTIALS_ENV = "RUSH_HPC_CREDENTIALS"
SECRET_ENV = "RUSH_HPC_SECRET"
SECRET_FILE_ENV = "RUSH_HPC_SECRET_FILE"


def default_secret_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "rush-hpc" / "secret"


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a file only its owner can read (created 0600 before any byte is written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_secret_file(path: str | os.PathLike[str]) -> bytes:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes().strip()
    except OSError as error:
        raise ConfigError(f"cannot read the secret file {path}: {error}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the secret file {path} is readable by others; run: chmod 600 {path}")
    return data


def resolve_secret(secret: str | bytes | None = None, *, create: bool = True,
                   environ: Mapping[str, str] | None = None) -> bytes | None:
    """The signing secret; creates the default secret file when nothing else is configured."""
    env = os.environ if environ is None else environ
    if secret is not None:
        return secret.encode() if isinstance(secret, str) else secret
    if env.get(SECRET_ENV):
        return env[SECRET_ENV].encode()
    if env.get(SECRET_FILE_ENV):
        return _read_secret_file(env[SECRET_FILE_ENV])
    default = default_secret_file()
    if default.exists():
        return _read_secret_file(default)
    if not create:
        return None
    value = secrets.token_hex(32).encode()
    write_private(default, value)
    return value


def credentials_blob(config: RedisConfig, secret: bytes | None) -> bytes:
    data: dict[str, Any] = {"redis": config.to_dict(),
                            "secret": secret.decode() if secret is not None else None}
    return json.dumps(data).encode()


def write_credentials(path: str | os.PathLike[str], config: RedisConfig, secret: bytes | None) -> Path:
    write_private(path, credentials_blob(config, secret))
    return Path(path)


def read_credentials(path: str | os.PathLike[str]) -> tuple[RedisConfig, bytes | None]:
    path = Path(os.path.expanduser(str(path)))
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the credentials file {path}: {error}") from None
    secret = data.get("secret")
    return RedisConfig.from_dict(data["redis"]), secret.encode() if secret else None
