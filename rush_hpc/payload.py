"""The worker loop payload: stored once per network by the controller, loaded by every worker.

``payload`` holds the signed cloudpickle of ``{"loop": fn, "globals": {...}}``; ``payload:meta`` holds
JSON the worker checks *before* unpickling: the environment fingerprint, the modules to import,
worker settings (heartbeat, log level), the SHA-256 of the payload and the spill path of a payload
too large for Redis.

Both are signed with the network's key (``Codec``), for the purposes ``"payload-meta"`` and
``"payload"``: the worker verifies the metadata before it acts on any of it (imports a module, reads
a spill file, applies a setting), and the payload's signature and hash before unpickling it. A
payload copied from another network, or metadata edited in Redis, is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

from .codec import Codec
from .credentials import create_private_file
from .exceptions import ConfigError, EnvironmentMismatchError, PayloadError, SignatureError

if TYPE_CHECKING:
    from .network import RushNetwork

DEFAULT_MAX_SIZE = 64 * 1024 * 1024
GlobalsArg = Mapping[str, Any] | Sequence[str] | None
PAYLOAD_PURPOSE = "payload"
#: names the worker's start call (its payload batch); without it a worker loads the latest loop
BATCH_ENV = "RUSH_HPC_BATCH"
META_PURPOSE = "payload-meta"


class VerifiedMeta(dict[str, Any]):
    """Payload metadata whose signature ``load_meta`` checked; ``load_payload`` takes nothing else."""


def payload_codec(network: RushNetwork) -> Codec:
    """The codec that signs this network's worker loop (its own key and purpose)."""
    return Codec(network.codec.secret, network.network, purpose=PAYLOAD_PURPOSE)


def resolve_globals(globals_: GlobalsArg, frame_depth: int = 2) -> dict[str, Any]:
    """``globals`` as a dict, or a list of names looked up in the caller's namespace (as in R rush)."""
    if globals_ is None:
        return {}
    if isinstance(globals_, Mapping):
        return dict(globals_)
    if isinstance(globals_, str):
        globals_ = [globals_]
    frame = sys._getframe(frame_depth)
    found: dict[str, Any] = {}
    for name in globals_:
        if name in frame.f_locals:
            found[name] = frame.f_locals[name]
        elif name in frame.f_globals:
            found[name] = frame.f_globals[name]
        else:
            raise ConfigError(f"global {name!r} is not defined where start_*_workers() was called; "
                              "pass globals={'name': value} instead")
    return found


def fingerprint() -> dict[str, str]:
    """What must match between controller and worker for a pickled function to load."""
    import cloudpickle

    from . import __version__

    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__,
            "rush_hpc": __version__}


def check_fingerprint(expected: Mapping[str, str]) -> None:
    here = fingerprint()
    problems = []
    if expected.get("python", "").split(".")[:2] != here["python"].split(".")[:2]:
        problems.append(f"worker has Python {here['python']}, controller {expected.get('python')}")
    for name in ("cloudpickle", "rush_hpc"):
        if expected.get(name) != here[name]:
            problems.append(f"worker has {name} {here[name]}, controller {expected.get(name)}")
    if problems:
        raise EnvironmentMismatchError(
            "; ".join(problems) + f" (worker interpreter: {sys.executable}). Start workers with the "
            "same environment as the controller (python=... / setup=[...]).")


def _check_picklable(loop: Callable[..., Any], globals_: Mapping[str, Any]) -> None:
    import cloudpickle

    for name, value in [("worker_loop", loop), *globals_.items()]:
        try:
            cloudpickle.dumps(value)
        except Exception as error:  # noqa: BLE001 - cloudpickle raises many kinds
            raise PayloadError(f"cannot serialize {'the worker loop' if name == 'worker_loop' else 'global ' + repr(name)}"
                               f" ({type(value).__name__}): {error}. Pass only picklable values "
                               "(create connections, files and locks inside the worker loop).") from None


def _by_value_modules(loop: Callable[..., Any]) -> list[Any]:
    """Modules of the loop that workers probably cannot import: user files outside site-packages.

    Their functions are pickled by value (cloudpickle), as for a loop defined in ``__main__``.
    """
    module = sys.modules.get(getattr(loop, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or path is None:
        return []
    if module.__name__.split(".")[0] == "rush_hpc" or "-packages" in path:
        return []
    return [module]


def store_payload(network: RushNetwork, loop: Callable[..., Any], globals_: Mapping[str, Any],
                  modules: Sequence[str], settings: Mapping[str, Any], *,
                  spill_dir: str | os.PathLike[str] | None = None,
                  max_size: int | None = None) -> dict[str, Any]:
    """Serialize, sign and store the payload; returns its meta data."""
    if not callable(loop):
        raise PayloadError(f"worker_loop must be a function taking one argument (rush), got {loop!r:.80}")
    import cloudpickle

    by_value = _by_value_modules(loop)
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        codec = payload_codec(network)
        blob = codec.dumps_pickle({"loop": loop, "globals": dict(globals_)})
    except PayloadError:
        raise
    except Exception:  # noqa: BLE001 - find the culprit for a clear message
        _check_picklable(loop, globals_)
        raise
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)
    meta: dict[str, Any] = {"fingerprint": fingerprint(), "modules": list(modules),
                            "settings": dict(settings), "size": len(blob),
                            "sha256": hashlib.sha256(blob).hexdigest()}
    max_size = DEFAULT_MAX_SIZE if max_size is None else max_size
    if len(blob) > max_size:
        if spill_dir is None:
            raise PayloadError(
                f"the worker loop and its globals take {len(blob) / 1e6:.1f} MB, more than the "
                f"{max_size / 1e6:.0f} MB limit for Redis. Pass payload_dir= (a directory every "
                "worker can read) or make the globals smaller (load large data inside the loop).")
        path = Path(spill_dir) / f"rush-payload-{network.network}-{uuid.uuid4().hex}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_private_file(path, blob)  # 0600, O_EXCL|O_NOFOLLOW: the globals may be private too
        meta["spill_path"] = str(path)
        blob = b""
    # the batch: content-addressed, so starting the same loop again (adapt) stores nothing new, and
    # two start calls with different loops on one network keep both (each worker loads its own)
    meta["batch"] = hashlib.sha256(blob + json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    meta_text = json.dumps(meta, sort_keys=True)
    envelope = json.dumps({"meta": meta_text, "mac": codec.sign(meta_text.encode(), purpose=META_PURPOSE).hex()})
    keys = network.keys
    pipe = network.redis.pipeline(transaction=True)
    for batch in (meta["batch"], None):  # its own keys, and "the latest" for workers that name no batch
        pipe.set(keys.batch_payload(batch), blob)
        pipe.set(keys.batch_payload_meta(batch), envelope)
    pipe.sadd(keys.payload_batches, meta["batch"])
    pipe.execute()
    return meta


def load_meta(network: RushNetwork, batch: str | None = None) -> VerifiedMeta:
    """The payload metadata of start call ``batch`` (None: the latest), after checking its signature
    (nothing in it is used before that)."""
    raw = network.redis.get(network.keys.batch_payload_meta(batch))
    if raw is None:
        raise PayloadError(f"network {network.network!r} has no worker loop in Redis"
                           + (f" for batch {batch!r}" if batch else "") + "; the controller stores it in "
                           "start_*_workers() (or was the network reset?)")
    what = "the worker loop's metadata"
    try:
        envelope = json.loads(raw)
        meta_text, mac = envelope["meta"], bytes.fromhex(envelope["mac"])
        if not isinstance(meta_text, str):
            raise TypeError("meta is not a string")
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise SignatureError(f"{what} in Redis is not signed; refusing to use it (was it written by "
                             "another rush-hpc version, or by someone without the secret?)") from None
    payload_codec(network).verify(mac, meta_text.encode(), what, purpose=META_PURPOSE)
    meta = json.loads(meta_text)
    if not isinstance(meta, dict):
        raise PayloadError(f"{what} is not a JSON object")
    if batch is not None and meta.get("batch") != batch:  # signed metadata of another start call
        raise SignatureError(f"{what} in Redis belongs to batch {meta.get('batch')!r}, not {batch!r}; "
                             "refusing to use it")
    return VerifiedMeta(meta)


def load_payload(network: RushNetwork, meta: Mapping[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Check the environment, import modules, verify the signature, unpickle; returns (loop, globals).

    ``meta`` must come from ``load_meta`` (verified): its modules are imported and its spill path
    read, so an unverified mapping is refused.
    """
    if not isinstance(meta, VerifiedMeta):
        raise PayloadError("load_payload() takes only the metadata returned by load_meta(), whose "
                           "signature was checked")
    check_fingerprint(meta["fingerprint"])
    for module in meta.get("modules", []):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001
            raise PayloadError(f"worker could not import module {module!r}: "
                               f"{type(error).__name__}: {error}") from None
    if meta.get("spill_path"):
        try:
            blob = Path(meta["spill_path"]).read_bytes()
        except OSError as error:
            raise PayloadError(f"worker cannot read the spilled payload {meta['spill_path']}: {error}; "
                               "payload_dir must be visible to every worker") from None
    else:
        blob = cast(bytes, network.redis.get(network.keys.batch_payload(meta.get("batch"))) or b"")
    codec = payload_codec(network)
    what = "the worker loop payload"
    if blob[:1] == b"p" and len(blob) > 33:
        codec.verify(blob[1:33], blob[33:], what, refusing="unpickle it")
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise SignatureError(f"{what} does not match the SHA-256 in its signed metadata (an older or "
                             "foreign payload was put in its place); refusing to unpickle it")
    try:
        payload = codec.loads_pickle(blob, what)
    except ModuleNotFoundError as error:
        raise PayloadError(f"the worker loop needs module {error.name!r}, which this worker cannot import "
                           f"({sys.executable}); install it on the workers, pass modules=[...], or define "
                           "the loop in your script") from None
    loop, globals_ = payload["loop"], payload["globals"]
    if globals_ and hasattr(loop, "__globals__"):
        loop.__globals__.update(globals_)
    return loop, globals_
