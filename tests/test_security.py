"""Security on real Redis servers: ACL users, TLS, signed payloads, secrets that never leak."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import cloudpickle
import pytest
import redis

import rush_hpc
from rush_hpc import RedisAuthError

from conftest import SECRET, require_cluster, start_redis_server, stop, wait_until
from rush_hpc.server import free_port
from test_workers import FAST, branin, wl_random_search, wl_until_terminated

cloudpickle.register_pickle_by_value(sys.modules[__name__])
ADMIN_PW = "admin-pw-c0ffee"
ALICE_PW = "alice-pw-deadbeef"


def readme_acl_rules() -> list[str]:
    """The ACL rules of the README's ``ACL SETUSER alice ...`` line: the test applies exactly those."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "ACL SETUSER alice" in line)
    words = shlex.split(line.split("ACL SETUSER alice", 1)[1])
    return [f">{ALICE_PW}" if word == ">alice-password" else word for word in words]


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory):
    process, port = start_redis_server(tmp_path_factory.mktemp("redis-acl"), "--requirepass", ADMIN_PW)
    admin = redis.Redis(port=port, password=ADMIN_PW)
    admin.execute_command("ACL", "SETUSER", "alice", *readme_acl_rules())
    admin.close()
    yield port
    stop(process)


def test_acl_user_restricted_to_its_network_works_end_to_end(acl_server):
    """The README's ACL line is enough to run a whole network (workers, fetches, reset)."""
    url = f"redis://alice:{ALICE_PW}@127.0.0.1:{acl_server}/0"
    admin = redis.Redis(port=acl_server, password=ADMIN_PW)
    rush = rush_hpc.rsh(network="alice-net", url=url, secret=SECRET)
    try:
        rush.start_local_workers(wl_random_search, n_workers=2, globals={"branin": branin}, **FAST)
        rush.wait_for_workers(2, timeout=30)
        wait_until(lambda: len(rush._ids_in_state("terminated")) == 2, 30, what="workers to end")
        assert rush.n_finished_tasks >= 100 and len(rush.fetch_finished_tasks()) >= 100
        rush.push_tasks([{"x1": 1.0, "x2": 2.0}], extra=[{"t": (1, 2)}])  # a signed pickle too
        assert len(rush.fetch_queued_tasks()) == 1 and len(rush.worker_info) == 2
        other = rush_hpc.rsh(network="bob-net", url=url, secret=SECRET)
        with pytest.raises(redis.exceptions.NoPermissionError):
            other.push_tasks([{"x": 1}])
        other.close()
    finally:
        rush.reset()
        rush.close()
    assert list(admin.scan_iter(match="rush:{alice-net}:*")) == []  # reset found every key without SCAN
    admin.close()


def test_acl_user_cannot_reach_other_networks_or_the_server(acl_server):
    """What a user holding the README's ACL line would try against other networks on a shared Redis."""
    admin = redis.Redis(port=acl_server, password=ADMIN_PW)
    admin.set("rush:{bob-net}:payload", "bob's")
    alice = redis.Redis(port=acl_server, username="alice", password=ALICE_PW)
    alice.set("rush:{alice-net}:x", "1")
    attempts = [("SCAN", "0"), ("SCAN", "0", "MATCH", "rush:*"), ("KEYS", "*"), ("RANDOMKEY",),
                ("DBSIZE",), ("SCRIPT", "FLUSH"), ("SCRIPT", "KILL"), ("FUNCTION", "FLUSH"),
                ("PUBLISH", "rush", "x"), ("SUBSCRIBE", "rush"), ("FLUSHALL",), ("FLUSHDB",),
                ("GET", "rush:{bob-net}:payload"), ("SET", "rush:{bob-net}:payload", "forged"),
                ("EXISTS", "rush:{bob-net}:payload"), ("TYPE", "rush:{bob-net}:payload"),
                ("EVAL", "return redis.call('GET', 'rush:{bob-net}:payload')", "0"),
                ("SORT", "rush:{alice-net}:x", "BY", "nosort", "GET", "rush:{bob-net}:*"),
                ("CONFIG", "SET", "dir", "/tmp"), ("MODULE", "LOAD", "/tmp/evil.so"), ("DEBUG", "SLEEP", "0"),
                ("CLIENT", "KILL", "127.0.0.1:1"), ("CLIENT", "LIST"), ("MONITOR",), ("SHUTDOWN",),
                ("ACL", "SETUSER", "alice", "+@all"), ("SWAPDB", "0", "1"), ("MIGRATE", "127.0.0.1", "1", "k", "0", "1")]
    allowed = []
    for command in attempts:
        try:
            alice.execute_command(*command)
        except redis.ResponseError:
            continue
        allowed.append(command)
    assert allowed == []
    assert admin.get("rush:{bob-net}:payload") == b"bob's"
    assert alice.evalsha(alice.script_load("return 1"), 0) == 1  # scripts of its own still load and run
    alice.delete("rush:{alice-net}:x")
    admin.delete("rush:{bob-net}:payload")
    alice.close()
    admin.close()


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
    (d / "other.ext").write_text("subjectAltName=DNS:other.example\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", []), ("other", ["-extfile", "other.ext"])):
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


def test_tls_certificate_for_another_host_is_refused(tls_files, tmp_path):
    """A server presenting a valid certificate (same CA) issued for another host name."""
    process, port = start_redis_server(
        tmp_path / "data", "--tls-cert-file", str(tls_files / "other.crt"), "--tls-key-file",
        str(tls_files / "other.key"), "--tls-ca-cert-file", str(tls_files / "ca.crt"),
        "--tls-auth-clients", "no", "--requirepass", ADMIN_PW, tls=True)
    try:
        url = f"rediss://:{ADMIN_PW}@127.0.0.1:{port}/0?ssl_ca_certs={tls_files}/ca.crt"
        with pytest.raises(rush_hpc.RedisUnavailableError, match="(?i)hostname|IP address mismatch"):
            rush_hpc.rsh(network="tls-other", url=url, secret=SECRET)
        # the control: only the host name check refuses it (the chain is valid)
        loose = redis.Redis(port=port, password=ADMIN_PW, ssl=True, ssl_ca_certs=str(tls_files / "ca.crt"),
                            ssl_check_hostname=False)
        assert loose.ping()
        loose.close()
    finally:
        stop(process)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARK}",))


EXPLOIT_MARK = Path(f"/tmp/rush-exploit-{os.getpid()}")


def _unsigned_pickle() -> bytes:
    return b"p" + b"\0" * 32 + pickle.dumps(_Exploit())


def test_tampered_payload_is_refused_and_the_worker_reports_it(rush, tmp_path):
    line = rush.worker_script(wl_until_terminated, python=sys.executable,
                              credentials_file=str(tmp_path / "credentials.json"))
    for key in (rush.keys.payload, rush.keys.batch_payload(rush._batch)):  # the latest, and this call's
        rush.redis.set(key, _unsigned_pickle())
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
    # the other controller re-stored the payload (and its metadata) with its own secret; a worker
    # given ours refuses it
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
    rush.redis.lset(rush.keys.finished, 0, f'["{plain[0]}", null, {{"y": 2}}, null, null, null, "w", "finished", [1]]')
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
            credentials = list(tmp_path.glob("credentials-*.json"))
            assert len(credentials) == 1 and oct(credentials[0].stat().st_mode & 0o777) == "0o600"
            rush.wait_for_workers(1, timeout=30)
            assert not credentials[0].exists()  # deleted once its worker registered
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
    files = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.*"))
    for text in (ps, environ.decode(errors="replace"), script, logs, caplog.text, files):
        assert ALICE_PW not in text and secret.decode() not in text
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


# -- credentials files on hostile ground ----------------------------------------------------------
def _root_or_skip(why: str) -> None:
    require_cluster("root", os.geteuid() == 0, f"{why} needs root (to own a file as another uid)")


def wl_touch_marker(rush):
    Path(os.environ["RUSH_TEST_MARKER"]).touch()


def _run_worker(network: str, credentials: Path, marker: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUSH_HPC_CREDENTIALS": str(credentials), "RUSH_TEST_MARKER": str(marker)}
    return subprocess.run([sys.executable, "-m", "rush_hpc", "worker", "--network", network, "--worker-id",
                           "w-victim"], env=env, capture_output=True, text=True, timeout=60)


def test_group_or_world_writable_log_dir_is_refused_with_the_fix(rush, tmp_path):
    shared = tmp_path / "project-group-dir"
    for mode in (0o770, 0o1777):
        shared.mkdir(exist_ok=True)
        shared.chmod(mode)
        with pytest.raises(rush_hpc.ConfigError, match=r"others can write to it.*chmod go-w"):
            rush.start_local_workers(wl_until_terminated, log_dir=str(shared), **FAST)
        assert not list(shared.iterdir())  # no secret was written there
    with pytest.raises(rush_hpc.ConfigError, match="chmod go-w"):
        rush.worker_script(credentials_file=str(shared / "creds.json"))


def test_directory_of_another_user_is_refused(rush, tmp_path):
    _root_or_skip("a directory of another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(rush_hpc.ConfigError, match="belongs to uid 65534"):
        rush.start_local_workers(wl_until_terminated, log_dir=str(theirs), **FAST)


def test_planted_symlink_is_never_followed(rush, tmp_path):
    victim = tmp_path / "victim-file"
    victim.write_text("precious")
    link = tmp_path / "creds.json"
    link.symlink_to(victim)
    rush.worker_script(credentials_file=str(link))
    assert victim.read_text() == "precious"  # the link was replaced, its target untouched
    assert not link.is_symlink() and oct(link.stat().st_mode & 0o777) == "0o600"
    from rush_hpc.credentials import create_private_file

    planted = tmp_path / "planted.json"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        create_private_file(planted, b"secret")
    assert victim.read_text() == "precious"


def test_worker_refuses_a_swapped_credentials_file(redis_config, network, tmp_path):
    """A project-group member swaps the credentials file for one naming their own loop."""
    attacker = rush_hpc.rsh(network=network, config=redis_config, secret=b"attacker-secret-0123456789")
    marker = tmp_path / "attacker-loop-ran"
    try:
        attacker.store_worker_loop(wl_touch_marker)
        swapped = tmp_path / "credentials-swapped.json"
        attacker.worker_script(credentials_file=str(swapped))
        # the control: a file that passes the checks does run the loop it names
        result = _run_worker(network, swapped, marker)
        assert result.returncode == 0 and marker.exists(), result.stderr
        marker.unlink()
        # mode 0644: refused
        swapped.chmod(0o644)
        result = _run_worker(network, swapped, marker)
        assert result.returncode == 2 and "its mode is 644, not 600" in result.stderr
        swapped.chmod(0o600)
        # a symlink to a valid file: refused
        link = tmp_path / "credentials-link.json"
        link.symlink_to(swapped)
        result = _run_worker(network, link, marker)
        assert result.returncode == 2 and "symbolic link" in result.stderr
        assert not marker.exists()
        # owned by another uid (the attacker): refused
        _root_or_skip("a credentials file of another uid")
        os.chown(swapped, 65534, 65534)
        result = _run_worker(network, swapped, marker)
        assert result.returncode == 2 and "belongs to uid 65534" in result.stderr, result.stderr
        assert not marker.exists()
    finally:
        attacker.reset()
        attacker.close()


def test_credentials_files_are_removed_after_registration_and_on_close(rush, tmp_path):
    rush.start_local_workers(wl_until_terminated, n_workers=2, log_dir=str(tmp_path), **FAST)
    first = list(tmp_path.glob("credentials-*.json"))
    assert len(first) == 1
    rush.wait_for_workers(2, timeout=30)
    assert not first[0].exists()
    rush.start_local_workers(wl_until_terminated, n_workers=1, log_dir=str(tmp_path), **FAST)
    second = list(tmp_path.glob("credentials-*.json"))
    assert len(second) == 1 and second != first  # a fresh name each time
    rush.stop_workers()
    rush.close()
    assert not second[0].exists()


# -- signatures bound to a network and a purpose ----------------------------------------------------
def _credentials_for(redis_config, directory: Path) -> Path:
    from rush_hpc.credentials import write_credentials

    return write_credentials(directory / "credentials.json", redis_config, SECRET)


def test_payload_copied_from_another_network_is_refused(redis_config, tmp_path):
    """Same secret, two networks: a Redis writer copies A's signed loop into B."""
    marker = tmp_path / "loop-ran"
    a = rush_hpc.rsh(network="net-a-" + tmp_path.name[-8:], config=redis_config, secret=SECRET)
    b = rush_hpc.rsh(network="net-b-" + tmp_path.name[-8:], config=redis_config, secret=SECRET)
    credentials = _credentials_for(redis_config, tmp_path)
    try:
        a.store_worker_loop(wl_touch_marker)
        b.store_worker_loop(wl_until_terminated)
        for key in ("payload", "payload_meta"):
            b.redis.set(getattr(b.keys, key), a.redis.get(getattr(a.keys, key)))
        result = _run_worker(b.network, credentials, marker)
        assert result.returncode == 1 and "wrong signature" in result.stderr, result.stderr
        assert f"for another network than {b.network!r}" in result.stderr
        assert not marker.exists()
        # the control: the same payload runs in its own network
        result = _run_worker(a.network, credentials, marker)
        assert result.returncode == 0 and marker.exists(), result.stderr
    finally:
        for net in (a, b):
            net.reset()
            net.close()


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module that leaves a marker file when imported (what an attacker's "modules" entry would do)."""
    name = f"rush_evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "evil-imported"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "evil"))
    # the control: importing it does leave the marker
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True, timeout=60)
    assert marker.exists()
    marker.unlink()
    return name, marker


def test_tampered_payload_meta_is_refused_before_any_import(rush, tmp_path, evil_module):
    name, marker = evil_module
    rush.store_worker_loop(wl_until_terminated)
    credentials = _credentials_for(rush.config, tmp_path)
    envelope = json.loads(rush.redis.get(rush.keys.payload_meta))
    meta = json.loads(envelope["meta"])
    attempts = {
        "edited, old signature": json.dumps({**envelope, "meta": json.dumps({**meta, "modules": [name]})}),
        "unsigned (plain meta)": json.dumps({**meta, "modules": [name]}),
        "signature dropped": json.dumps({"meta": json.dumps({**meta, "modules": [name]})}),
    }
    for what, forged in attempts.items():
        rush.redis.set(rush.keys.payload_meta, forged)
        result = _run_worker(rush.network, credentials, tmp_path / "unused")
        assert result.returncode == 1, (what, result.stderr)
        assert "wrong signature" in result.stderr or "not signed" in result.stderr, (what, result.stderr)
        assert not marker.exists(), f"{what}: the module was imported before the check"


def test_tampered_spill_path_is_never_opened(rush, tmp_path):
    """The spill path would point at a FIFO: a worker that opened it would hang (and time out)."""
    rush.store_worker_loop(wl_until_terminated)
    credentials = _credentials_for(rush.config, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    envelope = json.loads(rush.redis.get(rush.keys.payload_meta))
    meta = {**json.loads(envelope["meta"]), "spill_path": str(fifo)}
    rush.redis.set(rush.keys.payload_meta, json.dumps({**envelope, "meta": json.dumps(meta)}))
    result = _run_worker(rush.network, credentials, tmp_path / "unused")
    assert result.returncode == 1 and "wrong signature" in result.stderr


def test_older_signed_payload_of_the_same_network_does_not_match_the_meta(rush, tmp_path):
    rush.store_worker_loop(wl_touch_marker)
    old_blob = rush.redis.get(rush.keys.payload)
    rush.store_worker_loop(wl_until_terminated)
    rush.redis.set(rush.keys.batch_payload(rush._batch), old_blob)  # the blob this meta names
    marker = tmp_path / "old-loop-ran"
    result = _run_worker(rush.network, _credentials_for(rush.config, tmp_path), marker)
    assert result.returncode == 1 and "does not match the SHA-256" in result.stderr
    assert not marker.exists()


def test_a_value_larger_than_the_limit_never_reaches_redis(rush, worker):
    big = {"x": b"0" * (65 * 1024 * 1024)}  # above the 64 MB default
    with pytest.raises(rush_hpc.TaskError, match="larger than the 64 MiB limit"):
        rush.push_tasks([big])
    assert rush.n_queued_tasks == 0 and rush.redis.keys(rush.keys.task("*")) == []
    key = worker.push_running_tasks([{"x": 1}])
    with pytest.raises(rush_hpc.TaskError, match="limit"):
        worker.push_results(key, [{"y": "y" * (65 * 1024 * 1024)}])
    assert rush.n_finished_tasks == 0


# -- SSH host keys: a throwaway sshd on loopback, and a fake one that records what it is sent --------
@dataclasses.dataclass
class Sshd:
    port: int
    directory: Path
    log: Path
    client_key: Path
    host_keys: dict[str, str]  # name -> "ssh-ed25519 AAAA..."

    def known_hosts(self, key: str, name: str | None = None) -> None:
        name = name or f"[127.0.0.1]:{self.port}"
        (self.directory / "known_hosts").write_text(f"{name} {self.host_keys[key]}\n")

    def ssh_config(self, *extra: str) -> str:
        path = self.directory / f"ssh_config-{uuid.uuid4().hex[:6]}"
        path.write_text("\n".join(["Host 127.0.0.1", *(f"  {line}" for line in extra),  # first value wins
                                   f"  UserKnownHostsFile {self.directory / 'known_hosts'}",
                                   f"  GlobalKnownHostsFile {self.directory / 'global_known_hosts'}"]) + "\n")
        return str(path)

    def launcher(self, ssh_config: str | None = None, **options):
        from rush_hpc.launchers.ssh import SSHLauncher

        return SSHLauncher([f"root@127.0.0.1:{self.port}"], network="n", credentials=b"{}",
                           ssh_config=ssh_config or self.ssh_config(), connect_kwargs=self.connect_kwargs,
                           **options)

    @property
    def connect_kwargs(self) -> dict:
        return {"key_filename": str(self.client_key), "look_for_keys": False, "allow_agent": False}

    def logins(self) -> int:
        return self.log.read_text().count("Accepted publickey")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_cluster("root", os.geteuid() == 0, "the throwaway sshd runs as root (privilege separation)")
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("/usr/sbin/sshd is missing: install openssh-server (scripts/install-deps does)")
    d = tmp_path_factory.mktemp("sshd")
    d.chmod(0o700)
    for name in ("host_a", "host_b", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name), "-C", name], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    (d / "global_known_hosts").write_text("")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_a'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "LogLevel VERBOSE\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config"), "-E", str(log)])
    wait_until(lambda: _listening(port) or process.poll() is not None, 10, what="sshd to listen")
    if process.poll() is not None:
        pytest.fail(f"sshd exited: {log.read_text() if log.exists() else ''}")
    keys = {name: " ".join((d / f"{name}.pub").read_text().split()[:2]) for name in ("host_a", "host_b")}
    yield Sshd(port, d, log, d / "client", keys)
    process.terminate()
    process.wait(10)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _run_over_ssh(launcher) -> str:
    connection = launcher.connect(launcher.hosts[0])
    try:
        return launcher._exec(connection, "echo reached", timeout=30)[1].strip()
    finally:
        connection.close()


def test_unknown_ssh_host_key_is_refused_before_logging_in(sshd, rush):
    from rush_hpc.launchers.ssh_connection import HostKeyError

    (sshd.directory / "known_hosts").write_text("")
    before = sshd.logins()
    with pytest.raises(HostKeyError, match=r"not known \(ssh-ed25519 SHA256:.*ssh-keyscan -p \d+ 127.0.0.1 >> "
                                           r".*known_hosts.*host_key_policy='accept-new'"):
        _run_over_ssh(sshd.launcher())
    # the same through the public API: no worker, no credentials, a LaunchError naming the fix
    with pytest.raises(rush_hpc.LaunchError, match="host key of .* is not known.*accept-new"):
        rush.start_ssh_workers(wl_until_terminated, hosts=[f"root@127.0.0.1:{sshd.port}"],
                               ssh_config=sshd.ssh_config(), connect_kwargs=sshd.connect_kwargs)
    assert sshd.logins() == before  # the client key was never offered
    assert (sshd.directory / "known_hosts").read_text() == ""


def test_known_ssh_host_key_is_accepted_plain_or_hashed(sshd):
    sshd.known_hosts("host_a")
    assert _run_over_ssh(sshd.launcher(host_key_policy="reject")) == "reached"
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(sshd.directory / "known_hosts")], check=True,
                   capture_output=True)
    assert "|1|" in (sshd.directory / "known_hosts").read_text()
    assert _run_over_ssh(sshd.launcher()) == "reached"
    # HostKeyAlias: the key is looked up under the alias
    sshd.known_hosts("host_a", name="my-alias")
    assert _run_over_ssh(sshd.launcher(sshd.ssh_config("HostKeyAlias my-alias"))) == "reached"


def test_accept_new_records_the_key_then_it_is_known(sshd):
    known = sshd.directory / "known_hosts"
    known.write_text("")
    assert _run_over_ssh(sshd.launcher(host_key_policy="accept-new")) == "reached"
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_keys['host_a']}\n"
    assert _run_over_ssh(sshd.launcher(host_key_policy="reject")) == "reached"
    # StrictHostKeyChecking of the ssh_config is honoured; an explicit policy wins over it
    known.write_text("")
    from rush_hpc.launchers.ssh_connection import HostKeyError

    with pytest.raises(HostKeyError, match="not known"):
        _run_over_ssh(sshd.launcher(sshd.ssh_config("StrictHostKeyChecking yes")))
    with pytest.raises(HostKeyError, match="not known"):
        _run_over_ssh(sshd.launcher(sshd.ssh_config("StrictHostKeyChecking no"), host_key_policy="reject"))
    assert known.read_text() == ""
    assert _run_over_ssh(sshd.launcher(sshd.ssh_config("StrictHostKeyChecking accept-new"))) == "reached"
    assert sshd.host_keys["host_a"] in known.read_text()
    with pytest.raises(rush_hpc.ConfigError, match="host_key_policy must be one of"):
        sshd.launcher(host_key_policy="accept-any")
    # what scripts/test-cluster's ssh_config says today: accepted, and nothing written anywhere
    known.write_text("")
    loose = sshd.ssh_config("StrictHostKeyChecking no", "UserKnownHostsFile /dev/null")
    assert _run_over_ssh(sshd.launcher(loose)) == "reached" and known.read_text() == ""


def test_ssh_gateway_host_key_is_checked_too(sshd):
    from rush_hpc.launchers.ssh_connection import HostKeyError

    gateway = f"root@127.0.0.1:{sshd.port}"
    sshd.known_hosts("host_a")
    assert _run_over_ssh(sshd.launcher(gateway=gateway)) == "reached"
    sshd.known_hosts("host_b")
    before = sshd.logins()
    with pytest.raises(HostKeyError, match="CHANGED"):
        _run_over_ssh(sshd.launcher(gateway=gateway))
    assert sshd.logins() == before


def test_changed_ssh_host_key_is_refused_even_with_accept_new(sshd):
    from rush_hpc.launchers.ssh_connection import HostKeyError

    sshd.known_hosts("host_b")  # known_hosts remembers another key for this host:port
    before = sshd.logins()
    for policy in ("reject", "accept-new"):
        with pytest.raises(HostKeyError, match=r"CHANGED.*intercepting.*ssh-keygen -R \[127.0.0.1\]:\d+"):
            _run_over_ssh(sshd.launcher(host_key_policy=policy))
    assert sshd.logins() == before
    assert (sshd.directory / "known_hosts").read_text().count("\n") == 1  # nothing added
    revoked = sshd.directory / "known_hosts"
    revoked.write_text(f"@revoked * {sshd.host_keys['host_a']}\n")
    with pytest.raises(HostKeyError, match="@revoked"):
        _run_over_ssh(sshd.launcher(host_key_policy="accept-new"))
    assert sshd.logins() == before


class _RecordingServer:
    """A fake sshd with a fresh host key: records every authentication attempt it receives."""

    def __init__(self) -> None:
        import socket
        import threading

        import paramiko

        self.attempts: list[tuple[str, str]] = []
        self.key = paramiko.Ed25519Key.from_private_key(io.StringIO(self._keyfile()))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        recorder = self

        class Interface(paramiko.ServerInterface):
            def get_allowed_auths(self, username):
                return "password,publickey"

            def check_auth_password(self, username, password):
                recorder.attempts.append((username, password))
                return paramiko.AUTH_FAILED

            def check_auth_publickey(self, username, key):
                recorder.attempts.append((username, key.get_name()))
                return paramiko.AUTH_FAILED

        def handle(client) -> None:
            transport = paramiko.Transport(client)
            transport.add_server_key(self.key)
            try:
                transport.start_server(server=Interface())
                transport.accept(10)
            except Exception:  # noqa: BLE001 - the client hangs up, as it should
                pass
            finally:
                transport.close()

        def serve() -> None:
            while True:
                try:
                    client, _ = self.sock.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(client,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    @staticmethod
    def _keyfile() -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{directory}/k"], check=True)
            return Path(f"{directory}/k").read_text()

    def close(self) -> None:
        self.sock.close()


def test_spoofed_ssh_host_never_receives_the_password(tmp_path):
    from rush_hpc.launchers.ssh import SSHLauncher
    from rush_hpc.launchers.ssh_connection import HostKeyError

    server = _RecordingServer()
    config = tmp_path / "ssh_config"
    config.write_text(f"Host 127.0.0.1\n  UserKnownHostsFile {tmp_path / 'kh'}\n  GlobalKnownHostsFile /dev/null\n")
    options = {"network": "n", "credentials": b"{}", "ssh_config": str(config), "connect_timeout": 5,
               "connect_kwargs": {"password": "hunter2-ssh-password", "look_for_keys": False, "allow_agent": False}}
    try:
        launcher = SSHLauncher([f"alice@127.0.0.1:{server.port}"], **options)
        with pytest.raises(HostKeyError, match="not known"):
            launcher.connect(launcher.hosts[0]).open()
        assert server.attempts == []
        # the control: trusting it (accept-new) does hand it the password - which is what the check prevents
        trusting = SSHLauncher([f"alice@127.0.0.1:{server.port}"], host_key_policy="accept-new", **options)
        with pytest.raises(Exception):  # noqa: B017 - the fake server refuses every login
            trusting.connect(trusting.hosts[0]).open()
        assert ("alice", "hunter2-ssh-password") in server.attempts
    finally:
        server.close()


def test_task_values_of_one_network_are_refused_in_another(redis_config):
    a = rush_hpc.rsh(network="values-a", config=redis_config, secret=SECRET)
    b = rush_hpc.rsh(network="values-b", config=redis_config, secret=SECRET)
    try:
        blob = a.codec.encode({"x": (1, 2)})  # a signed pickle
        assert a.codec.decode(blob) == {"x": (1, 2)}
        with pytest.raises(rush_hpc.SignatureError, match="for another network than 'values-b'"):
            b.codec.decode(blob)
    finally:
        a.close()
        b.close()
