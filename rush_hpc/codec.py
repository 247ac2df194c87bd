"""Values to bytes and back: the one place that pickles and unpickles.

Format of an encoded value (first byte says which):

* ``j`` + JSON: plain data (None, bool, int, float, str, lists, dicts with str keys). Exact round trip,
  readable by any tool, and decoding never unpickles anything.
* ``p`` + 32-byte HMAC-SHA256 + cloudpickle: everything else (numpy arrays, tuples, objects). The HMAC
  is checked *before* unpickling; a missing or wrong signature raises ``SignatureError``.

Signatures are bound to a network and a purpose. One secret may serve many networks, so the HMAC key
of network N is derived from it with HKDF-SHA256 (RFC 5869, ``info = "rush-hpc network key" + N``),
and the MAC covers the purpose (``"task"`` for task values, ``"payload"`` / ``"payload-meta"`` for the
worker loop), the network, an optional context (say a task key and field) and the bytes. A blob
signed for network A, or for another purpose, fails verification in network B: copying a signed
value or a whole worker loop between networks (or from a task value into the payload) gets nowhere.

``encode`` refuses a value larger than ``max_size`` (64 MB by default) before anything is sent: one
huge value stalls Redis for everyone (heartbeats expire) and every reader that fetches it.

JSON was chosen by measurement (scripts/bench, "encode / decode" rows): for a typical task dict it
is as fast as signed cloudpickle or faster, half the size, readable by any tool, and safe to decode.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from .exceptions import ConfigError, SignatureError, TaskError

DEFAULT_MAX_VALUE_SIZE = 64 * 1024 * 1024
JSON_TAG = b"j"
PICKLE_TAG = b"p"
_MAC_SIZE = 32
_PLAIN_SCALARS = (str, int, float, bool, type(None))
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))  # reused: json.dumps builds one per call
_JSON_DECODER = json.JSONDecoder()


def loads_json(blob: bytes) -> Any:
    """Decode a ``j``-tagged value (the caller checked the tag)."""
    return _JSON_DECODER.decode(blob[1:].decode())


def is_plain(value: Any) -> bool:
    """True when JSON round-trips ``value`` exactly (no tuples, no non-str keys, no subclasses)."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is list:
        return all(is_plain(item) for item in value)
    if kind is dict:
        return all(type(key) is str and is_plain(item) for key, item in value.items())
    return False


def hkdf_sha256(secret: bytes, info: bytes, salt: bytes = b"rush-hpc hkdf salt v1", length: int = 32) -> bytes:
    """HKDF (RFC 5869) with SHA-256 from the standard library: one independent key per ``info``."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    blocks, block = [], b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        blocks.append(block)
    return b"".join(blocks)[:length]


def _field(value: str | bytes) -> bytes:
    """Length-prefixed, so that no two (purpose, network, context) triples read the same."""
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(8, "big") + data


class Codec:
    """Encodes values for Redis; signs and verifies pickles with a key of one network.

    ``Codec(secret, network)`` derives the network's key from ``secret``; ``purpose`` is what
    ``encode``/``decode`` sign for (``"task"``), ``for_purpose`` gives a sibling codec for another.
    Without ``network`` the signatures are bound to the empty network name (still keyed by purpose).
    """

    def __init__(self, secret: bytes | None, network: str | None = None, *, purpose: str = "task",
                 max_size: int = DEFAULT_MAX_VALUE_SIZE) -> None:
        if secret is not None and len(secret) < 16:
            raise ConfigError("the signing secret must be at least 16 bytes long")
        self._secret = secret
        self.network = network or ""
        self.purpose = purpose
        self.max_size = max_size
        self._key = None if secret is None else hkdf_sha256(secret, b"rush-hpc network key\0" + self.network.encode())

    @property
    def secret(self) -> bytes | None:
        """The signing secret; launchers hand it to workers in their credentials file."""
        return self._secret

    def for_purpose(self, purpose: str) -> Codec:
        """The same network's codec signing for another purpose."""
        return Codec(self._secret, self.network, purpose=purpose, max_size=self.max_size)

    def sign(self, data: bytes, context: str | bytes = b"", *, purpose: str | None = None) -> bytes:
        """HMAC-SHA256 with the network's key over (purpose, network, context, data)."""
        if self._key is None:
            raise SignatureError(
                "cannot sign a pickled value: no secret configured. Set RUSH_HPC_SECRET (or "
                "RUSH_HPC_SECRET_FILE), or pass secret= to rsh()/RushWorker().")
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (purpose or self.purpose, self.network, context):
            mac.update(_field(part))
        mac.update(data)
        return mac.digest()

    def verify(self, mac: bytes, data: bytes, what: str, context: str | bytes = b"", *,
               purpose: str | None = None, refusing: str = "use it") -> None:
        """Raise ``SignatureError`` unless ``mac`` signs ``data`` for this network and purpose."""
        if self._key is None:
            raise SignatureError(
                f"{what} is signed but no secret is configured to verify it; set RUSH_HPC_SECRET "
                "(or RUSH_HPC_SECRET_FILE) to the controller's secret")
        if not hmac.compare_digest(mac, self.sign(data, context, purpose=purpose)):
            raise SignatureError(
                f"{what} has a wrong signature: it was written with another secret, for another "
                f"network than {self.network!r} or another purpose, or tampered with; refusing to {refusing}")

    def dumps_pickle(self, value: Any, context: str | bytes = b"", *, purpose: str | None = None) -> bytes:
        import cloudpickle

        data = cloudpickle.dumps(value)
        return PICKLE_TAG + self.sign(data, context, purpose=purpose) + data

    def loads_pickle(self, blob: bytes, what: str = "value", context: str | bytes = b"", *,
                     purpose: str | None = None) -> Any:
        if blob[:1] != PICKLE_TAG or len(blob) < 1 + _MAC_SIZE:
            raise SignatureError(f"{what} is not a signed pickle; refusing to unpickle it")
        if self._key is None:
            raise SignatureError(
                f"{what} is a signed pickle but no secret is configured to verify it; set "
                "RUSH_HPC_SECRET (or RUSH_HPC_SECRET_FILE) to the controller's secret")
        mac, data = blob[1:1 + _MAC_SIZE], blob[1 + _MAC_SIZE:]
        self.verify(mac, data, what, context, purpose=purpose, refusing="unpickle it")
        import pickle

        return pickle.loads(data)

    def encode(self, value: Any, context: str | bytes = b"") -> bytes:
        if is_plain(value):
            blob = JSON_TAG + _JSON_ENCODER.encode(value).encode()
        else:
            blob = self.dumps_pickle(value, context)
        if len(blob) > self.max_size:
            raise TaskError(
                f"a value of {len(blob) / 2**20:.1f} MiB is larger than the {self.max_size / 2**20:g} MiB "
                "limit for one value in Redis (Codec.max_size); store large data in files and pass "
                "their paths, or raise the limit")
        return blob

    def decode(self, blob: bytes | None, what: str = "task value", context: str | bytes = b"") -> Any:
        if blob is None:
            return None
        if blob[:1] == JSON_TAG:
            return loads_json(blob)
        return self.loads_pickle(blob, what, context)
