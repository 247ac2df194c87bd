"""Security on real Redis servers: ACL users, TLS, signed payloads, secrets that never leak."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import redis

import rush_hpc
from rush_hpc import RedisAuthError

from conftest import SECRET, start_redis_server, stop, wait_until
from test_workers import FAST, branin, wl_random_search, wl_until_terminated

cloudpickle.register_pickle_by_value(sys.modules[__name__])
ADMIN_PW = "admin-pw-c0ffee"
ALICE_PW = "alice-pw-deadbeef"


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory):
    process, port = start_redis_server(
        tmp_path_factory.mktemp("redis-acl"), "--requirepass", ADMIN_PW,
        "--user", "alice", "on", f">{ALICE_PW}", "~rush:{alice-net}:*", "&*", "+@all", "-@admin",
        "-@dangerous", "+info")
    yield port
    stop(process)


def test_acl_user_restricted_to_its_network_works_end_to_end(acl_server):
    url = f"redis://alice:{ALICE_PW}@127.0.0.1:{acl_server}/0"
    rush = rush_hpc.rsh(network="alice-net", url=url, secret=SECRET)
    try:
        rush.start_local_workers(wl_random_search, n_workers=2, globals={"branin": branin}, **FAST)
        wait_until(lambda: len(rush._ids_in_state("terminated")) == 2, 30, what="workers to end")
        assert rush.n_finished_tasks >= 100
        other = rush_hpc.rsh(network="bob-net", url=url, secret=SECRET)
        with pytest.raises(redis.exceptions.NoPermissionError):
            other.push_tasks([{"x": 1}])
        other.close()
    finally:
        rush.reset()
        rush.close()


def test_wrong_password_and_missing_password_give_clear_errors(acl_server):
    with pytest.raises(RedisAuthError, match=r"\*\*\*.*refused the credentials") as error:
        rush_hpc.rsh(network="n", url=f"redis://alice:wrong-pw@127.0.0.1:{acl_server}/0")
    assert "wrong-pw" not in str(error.value)
    with pytest.raises(RedisAuthError, match="give a password"):
        rush_hpc.rsh(network="n", url=f"redis://127.0.0.1:{acl_server}/0")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=rush-test-ca")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", *extra)
    return d


@pytest.fixture(scope="module")
def tls_server(tls_files):
    process, port = start_redis_server(
        tls_files / "data", "--tls-cert-file", str(tls_files / "server.crt"), "--tls-key-file",
        str(tls_files / "server.key"), "--tls-ca-cert-file", str(tls_files / "ca.crt"),
        "--tls-auth-clients", "yes", "--requirepass", ADMIN_PW, tls=True)
    yield port
    stop(process)


def test_tls_with_client_certificate_end_to_end_with_a_local_worker(tls_server, tls_files):
    url = (f"rediss://:{ADMIN_PW}@127.0.0.1:{tls_server}/0?ssl_ca_certs={tls_files}/ca.crt"
           f"&ssl_certfile={tls_files}/client.crt&ssl_keyfile={tls_files}/client.key")
    rush = rush_hpc.rsh(network="tls-net", url=url, secret=SECRET)
    try:
        assert rush.config.ssl and "***" in str(rush.config)
        rush.start_local_workers(wl_random_search, n_workers=2, globals={"branin": branin}, **FAST)
        wait_until(lambda: len(rush._ids_in_state("terminated")) == 2, 30, what="workers to end")
        assert rush.n_finished_tasks >= 100
    finally:
        rush.reset()
        rush.close()
    with pytest.raises(rush_hpc.RedisUnavailableError, match="cannot reach Redis"):
        rush_hpc.rsh(network="x", url=f"rediss://:{ADMIN_PW}@127.0.0.1:{tls_server}/0?ssl_ca_certs={tls_files}/ca.crt")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARK}",))


EXPLOIT_MARK = Path(f"/tmp/rush-exploit-{os.getpid()}")


def _unsigned_pickle() -> bytes:
    return b"p" + b"\0" * 32 + pickle.dumps(_Exploit())


def test_tampered_payload_is_refused_and_the_worker_reports_it(rush, tmp_path):
    line = rush.worker_script(wl_until_terminated, python=sys.executable,
                              credentials_file=str(tmp_path / "credentials.json"))
    rush.redis.set(rush.keys.payload, _unsigned_pickle())
    result = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "wrong signature" in result.stderr
    assert not EXPLOIT_MARK.exists()
    info = rush.worker_info
    assert info["state"].tolist() == ["failed"] and "wrong signature" in info["reason"][0]
    assert "refusing to unpickle" in " ".join(rush.read_log()["message"])


def test_payload_signed_with_another_secret_is_refused(rush, redis_config):
    rush.store_worker_loop(wl_until_terminated)
    other = rush_hpc.rsh(network=rush.network, config=redis_config, secret=b"another-secret-0123456789")
    other.start_local_workers(wl_until_terminated, **FAST)
    original = rush.redis.get(rush.keys.payload)
    assert original[:1] == b"p"
    # the other controller re-stored the payload with its own secret; a worker given ours refuses it
    rush.redis.set(rush.keys.payload, other.codec.dumps_pickle({"loop": wl_until_terminated, "globals": {}}))
    from rush_hpc.bootstrap import run_worker

    assert run_worker(rush.network, "w-refuses", redis_config, SECRET, in_process=True) == 1
    assert "wrong signature" in rush.redis.hget(rush.keys.worker("w-refuses"), "reason").decode()
    other.reset()
    other.close()


def test_tampered_task_value_is_refused(rush, worker, caplog):
    """A tampered value is never unpickled: its row is reported and skipped, the others are read."""
    pickled = worker.push_running_tasks([{"x": 1}])
    worker.push_results(pickled, [{"y": (1, 2)}])  # a tuple travels as a signed pickle
    good = worker.push_running_tasks([{"x": 0}])
    worker.push_results(good, [{"y": 0}])
    rush.redis.hset(rush.keys.task(pickled[0]), "ys", _unsigned_pickle())
    with caplog.at_level(logging.WARNING):
        assert list(rush.fetch_finished_tasks()["keys"]) == good
        assert list(rush.fetch_tasks()["keys"]) == good
    assert "wrong signature" in caplog.text and pickled[0] in caplog.text
    # a forged finished row that points a plain task at a forged pickle is refused too
    rush.redis.delete(rush.keys.finished)
    plain = worker.push_running_tasks([{"x": 2}])
    worker.push_results(plain, [{"y": 2}])
    rush.redis.hset(rush.keys.task(plain[0]), "xs", _unsigned_pickle())
    rush.redis.lset(rush.keys.finished, 0, f'["{plain[0]}", null, {{"y": 2}}, null, null, "w", [1]]')
    other = rush_hpc.rsh(network=rush.network, config=rush.config, secret=SECRET)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert other.fetch_finished_tasks().empty
    assert "wrong signature" in caplog.text
    other.close()
    assert not EXPLOIT_MARK.exists()


def test_no_secret_in_ps_environment_files_or_logs(acl_server, tmp_path, caplog):
    url = f"redis://alice:{ALICE_PW}@127.0.0.1:{acl_server}/0"
    secret = b"top-secret-signing-key-42"
    with caplog.at_level(logging.DEBUG):
        rush = rush_hpc.rsh(network="alice-net", url=url, secret=secret)
        try:
            ids = rush.start_local_workers(wl_until_terminated, n_workers=1, log_dir=str(tmp_path), log_level="DEBUG",
                                           **FAST)
            rush.wait_for_workers(1, timeout=30)
            pid = int(rush.worker_info["pid"][0])
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            script = rush.worker_script()
            rush.stop_workers()
            wait_until(lambda: rush._ids_in_state("terminated") == ids, 10, what="terminated")
            logs = " ".join(rush.read_log()["message"]) + repr(rush) + str(rush.worker_info.to_dict())
        finally:
            rush.reset()
            rush.close()
    files = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.*") if p.name != "credentials.json")
    for text in (ps, environ.decode(errors="replace"), script, logs, caplog.text, files):
        assert ALICE_PW not in text and secret.decode() not in text
    assert oct((tmp_path / "credentials.json").stat().st_mode & 0o777) == "0o600"
    assert "RUSH_HPC_SECRET='***'" in script and "alice:***@" in script


def test_default_secret_file_is_private(monkeypatch, tmp_path):
    from rush_hpc.credentials import resolve_secret

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    secret = resolve_secret()
    path = tmp_path / "rush-hpc" / "secret"
    assert path.read_bytes() == secret and oct(path.stat().st_mode & 0o777) == "0o600"
    path.chmod(0o644)
    with pytest.raises(rush_hpc.ConfigError, match="chmod 600"):
        resolve_secret()
