"""The two secrets a worker needs (Redis password, signing secret) and how they travel.

They never go on a command line, into a job script or a log: a launcher writes them to a
credentials file with mode 0600 (locally, on a shared path, or uploaded over SFTP) and the worker
finds the file through the ``RUSH_HPC_CREDENTIALS`` environment variable.

A shared directory is hostile ground: the controller creates the file under a fresh random name with
``O_CREAT|O_EXCL|O_NOFOLLOW`` only in a directory that no one else can write to, and a worker reads
it only if it is a regular file of its own uid with mode 0600 (never through a symlink). The
controller deletes it once the workers registered, or at ``close()``.

The signing secret comes from, in order: ``secret=``, ``RUSH_HPC_SECRET``, the file named by
``RUSH_HPC_SECRET_FILE``, or ``~/.config/rush-hpc/secret`` (created with mode 0600 when missing, so
that a controller and in-process workers of one user agree without configuration).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Mapping, Protocol

from .config import RedisConfig
from .exceptions import ConfigError

logger = logging.getLogger(__name__)

CREDENTIALS_ENV = "RUSH_HPC_CREDENTIALS"
SECRET_ENV = "RUSH_HPC_SECRET"
SECRET_FILE_ENV = "RUSH_HPC_SECRET_FILE"


def default_secret_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "rush-hpc" / "secret"


def check_private_directory(directory: str | os.PathLike[str]) -> Path:
    """``directory``, after checking that only its owner - this user - can add or swap files in it.

    A credentials file in a directory that others may write to can be replaced between the
    controller writing it and a worker reading it (another member of a project group swaps in their
    own Redis and loop), so such a directory is refused with the command that fixes it.
    """
    path = Path(directory)
    try:
        info = path.stat()
    except OSError as error:
        raise ConfigError(f"cannot use {path} for credentials: {error}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"cannot use {path} for credentials: not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"refusing to write credentials into {path}: it belongs to uid {info.st_uid}, "
                          f"not to you (uid {os.getuid()}); use a directory of your own (log_dir=...)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"refusing to write credentials into {path}: others can write to it (mode "
                          f"{stat.S_IMODE(info.st_mode):o}), so they could swap the file. Run "
                          f"`chmod go-w {path}` or pick a private directory (log_dir=...)")
    return path


def create_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 and write ``data``; fails if anything (a file, a symlink) is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a file only its owner can read (0600 from its first byte).

    The bytes go to a fresh, exclusively created file (``O_EXCL|O_NOFOLLOW``: a planted symlink is
    never followed, nothing existing is written through) that is then renamed over ``path``; a
    rename replaces a symlink itself, never its target.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    create_private_file(temporary, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
    default.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        create_private_file(default, value)
    except FileExistsError:  # another process created it first: use theirs, so both agree
        return _read_secret_file(default)
    return value


def credentials_blob(config: RedisConfig, secret: bytes | None) -> bytes:
    data: dict[str, Any] = {"redis": config.to_dict(),
                            "secret": secret.decode() if secret is not None else None}
    return json.dumps(data).encode()


class Removable(Protocol):
    """A credentials file, local or on a remote host, that the controller deletes when it is spent."""

    def remove(self) -> None: ...


class CredentialsFile:
    """One credentials file the controller wrote for its workers; ``remove()`` deletes it.

    The controller removes it once every worker that reads it has registered (or ended), and at
    ``close()`` at the latest, so the secrets do not stay on disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def remove(self) -> None:
        """Delete the file (idempotent; a file already gone is fine)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("could not delete the credentials file %s: %s", self.path, error)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"CredentialsFile({str(self.path)!r})"


def create_credentials_file(directory: str | os.PathLike[str], config: RedisConfig,
                            secret: bytes | None) -> CredentialsFile:
    """A new credentials file with a fresh random name in a private ``directory``.

    Created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600: it never overwrites or writes through
    anything already there, and only a directory no one else can write to is accepted.
    """
    folder = check_private_directory(directory)
    path = folder / f"credentials-{secrets.token_hex(12)}.json"
    try:
        create_private_file(path, credentials_blob(config, secret))
    except OSError as error:
        raise ConfigError(f"cannot create the credentials file {path}: {error}") from None
    return CredentialsFile(path)


def write_credentials(path: str | os.PathLike[str], config: RedisConfig, secret: bytes | None) -> Path:
    """Write the credentials to a path the user chose (``worker_script(credentials_file=...)``)."""
    path = Path(os.path.expanduser(str(path)))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private_directory(path.parent)
    write_private(path, credentials_blob(config, secret))
    return path


def check_credentials_file(fd: int, path: Path) -> None:
    """Trust a credentials file only if this user wrote it: a regular file, owned by our uid,
    mode 0600 (no bit for group or others), one link. Anything else may come from another user."""
    info = os.fstat(fd)
    problems = []
    if not stat.S_ISREG(info.st_mode):
        problems.append("it is not a regular file")
    if info.st_uid != os.getuid():
        problems.append(f"it belongs to uid {info.st_uid}, not to this worker's uid {os.getuid()}")
    if info.st_mode & 0o077:
        problems.append(f"its mode is {stat.S_IMODE(info.st_mode):o}, not 600")
    if info.st_nlink != 1:
        problems.append(f"it has {info.st_nlink} hard links")
    if problems:
        raise ConfigError(f"refusing the credentials file {path}: {'; '.join(problems)}. The controller "
                          "writes it with mode 0600 in a private directory; someone else may have "
                          "replaced it (check the directory's permissions: chmod go-w)")


def read_credentials(path: str | os.PathLike[str]) -> tuple[RedisConfig, bytes | None]:
    """Read a credentials file after checking it is this user's own (never through a symlink)."""
    path = Path(os.path.expanduser(str(path)))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigError(f"refusing the credentials file {path}: it is a symbolic link") from None
        raise ConfigError(f"cannot read the credentials file {path}: {error}") from None
    try:
        check_credentials_file(fd, path)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read()
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        secret = data.get("secret")
        return RedisConfig.from_dict(data["redis"]), secret.encode() if secret else None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"cannot read the credentials file {path}: {type(error).__name__}: {error}") from None
