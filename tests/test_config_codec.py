"""RedisConfig parsing and redaction, the codec's formats and signatures, the public API surface."""

from __future__ import annotations

import pytest

import rush_hpc
from rush_hpc.codec import Codec, is_plain
from rush_hpc.config import RedisConfig, redact_url
from rush_hpc.exceptions import ConfigError, SignatureError
from rush_hpc.keys import NetworkKeys


def test_url_round_trip_with_acl_user_and_tls_options():
    config = RedisConfig.from_url("rediss://alice:p%40ss@redis.example:6380/2?ssl_ca_certs=/ca.crt")
    assert (config.host, config.port, config.db, config.username, config.password, config.ssl) == \
        ("redis.example", 6380, 2, "alice", "p@ss", True)
    assert config.ssl_ca_certs == "/ca.crt"
    assert config.to_url() == "rediss://alice:***@redis.example:6380/2?ssl_ca_certs=%2Fca.crt"
    assert RedisConfig.from_url(config.to_url(show_secrets=True)) == config


def test_password_never_in_repr_str_or_errors():
    config = RedisConfig.from_url("redis://:hunter2secret@127.0.0.1:1/0")
    assert "hunter2secret" not in repr(config) + str(config)
    assert redact_url("redis://u:hunter2secret@h:1/0") == "redis://u:***@h:1/0"
    with pytest.raises(rush_hpc.RedisUnavailableError) as error:
        rush_hpc.rsh(network="n", url="redis://:hunter2secret@127.0.0.1:1/0")
    assert "hunter2secret" not in str(error.value) and "***" in str(error.value)


@pytest.mark.parametrize("url, message", [
    ("http://host", "must start with redis://"),
    ("redis://host:99999", "invalid port"),
    ("redis://host/abc", "must be a number"),
    ("redis://host?foo=1", "unknown Redis URL option"),
])
def test_bad_urls(url, message):
    with pytest.raises(ConfigError, match=message):
        RedisConfig.from_url(url)


def test_env_config(monkeypatch):
    env = {"RUSH_HPC_URL": "redis://h:7/1", "RUSH_HPC_REDIS_PASSWORD": "pw"}
    config = RedisConfig.from_env(env)
    assert (config.host, config.port, config.db, config.password) == ("h", 7, 1, "pw")
    assert RedisConfig.from_env({}) is None


def test_bad_network_name():
    with pytest.raises(ConfigError, match="network name"):
        NetworkKeys("a*b")
    with pytest.raises(ConfigError, match="network name"):
        NetworkKeys("{tag}")


def test_is_plain():
    assert is_plain({"a": [1, 2.0, None, True, "s", {"b": []}]})
    assert not is_plain({"a": (1, 2)}) and not is_plain({1: "x"}) and not is_plain({"a": b"x"})


def test_signatures():
    codec, other = Codec(b"k" * 32), Codec(b"o" * 32)
    blob = codec.encode({"t": (1,)})
    assert blob[:1] == b"p" and codec.decode(blob) == {"t": (1,)}
    with pytest.raises(SignatureError, match="wrong signature"):
        other.decode(blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SignatureError, match="wrong signature"):
        codec.decode(tampered)
    with pytest.raises(SignatureError, match="no secret is configured"):
        Codec(None).decode(blob)
    with pytest.raises(SignatureError, match="not a signed pickle"):
        codec.loads_pickle(b"j{}")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Codec(b"short")


def test_public_api_is_sorted_and_complete():
    assert rush_hpc.__all__ == sorted(rush_hpc.__all__)
    for name in rush_hpc.__all__:
        assert hasattr(rush_hpc, name)


def test_public_names_match_their_modules():
    from rush_hpc import _EXPORTS

    assert set(_EXPORTS) | {"__version__"} == set(rush_hpc.__all__)


def test_signatures_are_bound_to_network_purpose_and_context():
    secret = b"k" * 32
    a, b = Codec(secret, "net-a"), Codec(secret, "net-b")
    blob = a.encode({"t": (1,)})
    assert a.decode(blob) == {"t": (1,)}
    with pytest.raises(SignatureError, match="for another network than 'net-b'"):
        b.decode(blob)
    with pytest.raises(SignatureError, match="wrong signature"):
        a.for_purpose("payload").decode(blob)
    with pytest.raises(SignatureError, match="wrong signature"):
        a.loads_pickle(a.dumps_pickle((1,), purpose="payload"))
    keyed = a.encode((2,), context="task:1 ys")
    assert a.decode(keyed, context="task:1 ys") == (2,)
    with pytest.raises(SignatureError, match="wrong signature"):
        a.decode(keyed, context="task:2 ys")
    # the key is derived per network: the raw secret alone does not verify anything
    import hashlib
    import hmac

    data = blob[33:]
    assert blob[1:33] != hmac.new(secret, data, hashlib.sha256).digest()


def test_hkdf_matches_rfc5869_test_case_1():
    from rush_hpc.codec import hkdf_sha256

    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
           "34007208d5b887185865")
    assert hkdf_sha256(ikm, info, salt, 42).hex() == okm


def test_value_size_limit_is_configurable():
    codec = Codec(b"k" * 32, "n", max_size=100)
    assert codec.decode(codec.encode({"x": "a" * 50})) == {"x": "a" * 50}
    with pytest.raises(rush_hpc.TaskError, match="limit for one value"):
        codec.encode({"x": "a" * 200})
    with pytest.raises(rush_hpc.TaskError, match="limit for one value"):
        codec.encode({"x": ("a" * 200,)})
