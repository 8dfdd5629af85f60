"""Redis over TLS with the URL exactly as the README documents it: a real redis-server with
TLS, a private CA, a real worker process and a real client process. Broker and result backend
both connect over TLS; a certificate issued for another host is refused by every client."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from embedq.broker.tls import connection_tls
from tests.helpers import free_port, run_client, worker

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PASSWORD = "tls-" + uuid.uuid4().hex[:12]
# The README's form: rediss://:password@host:6380/0?ssl_ca_certs=/path/ca.pem
DOCUMENTED = re.compile(r"`(rediss://:password@host:6380/0\?ssl_ca_certs=/path/ca\.pem)`")

CLIENT = textwrap.dedent(
    """
    import json, sys
    from embedq.tasks import embed_texts
    vectors = embed_texts.delay(json.loads(sys.argv[1])).get(timeout=120)
    print(json.dumps({"shape": list(vectors.shape)}))
    """
)

# Each client embedq configures from EMBEDQ_REDIS_URL, one after the other.
PROBE = textwrap.dedent(
    """
    import json
    from embedq.app import app
    from embedq.broker.client import connect

    def attempt(fn):
        try:
            fn()
            return "connected"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def broker():
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)

    out = {
        "backend": attempt(lambda: app.backend.client.ping()),
        "broker": attempt(broker),
        "cache": attempt(lambda: connect().ping()),
    }
    print(json.dumps(out))
    """
)


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)


def _certificates(folder: Path, san: str) -> dict[str, str]:
    """A private CA and a server certificate for ``san`` (e.g. ``IP:127.0.0.1``) it signed."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    ca, key, crt = folder / "ca.pem", folder / "server.key", folder / "server.pem"
    _openssl(
        folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=embedq-test-ca", "-keyout", "ca.key", "-out", str(ca),
    )  # fmt: skip
    _openssl(
        folder, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=embedq-test-server",
        "-keyout", str(key), "-out", "server.csr",
    )  # fmt: skip
    (folder / "san.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        folder, "x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", str(crt),
    )  # fmt: skip
    return {"ca": str(ca), "key": str(key), "crt": str(crt)}


def _answers(port: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@contextmanager
def tls_redis(folder: Path, certs: dict[str, str]) -> Iterator[int]:
    """Debian's redis-server listening only on a TLS port (password required); yields it."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server (Debian package) is not installed")
    port = free_port()
    cmd = ["redis-server", "--port", "0", "--tls-port", str(port), "--save", "", "--dir"]
    cmd += [str(folder), "--requirepass", PASSWORD, "--tls-auth-clients", "no"]
    cmd += ["--tls-cert-file", certs["crt"], "--tls-key-file", certs["key"]]
    cmd += ["--tls-ca-cert-file", certs["ca"]]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        if not _answers(port):
            pytest.fail("redis-server with TLS did not start (built without TLS?)")
        yield port
    finally:
        server.kill()
        server.wait(10)


def documented_url(port: int, ca: str) -> str:
    """The README's TLS URL with this test's password, port and CA: nothing added."""
    readme = (ROOT / "README.md").read_text()
    documented = DOCUMENTED.search(readme)
    assert documented, "the README no longer documents the rediss:// URL this test uses"
    url = documented.group(1).replace(":password@", f":{PASSWORD}@")
    return url.replace("host:6380", f"127.0.0.1:{port}").replace("/path/ca.pem", ca)


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EMBEDQ_REDIS_URL=url,
        EMBEDQ_DATABASE_URL=f"sqlite:///{tmp_path / 'tls.db'}",
        EMBEDQ_DATA_DIR=str(tmp_path / "data"),
        EMBEDQ_WORKER_CONCURRENCY="4",
        EMBEDQ_METRICS_PORT="0",
    )
    return env


def test_the_readme_rediss_url_carries_a_whole_embedding_round_trip(tmp_path):
    certs = _certificates(tmp_path / "certs", "IP:127.0.0.1")
    with tls_redis(tmp_path, certs) as port:
        url = documented_url(port, certs["ca"])
        assert "ssl_cert_reqs" not in url
        env = _env(tmp_path, url)
        assert json.loads(run_client(env, PROBE)) == {
            "backend": "connected",
            "broker": "connected",
            "cache": "connected",
        }
        log = tmp_path / "worker.log"
        with worker(env, log, ready=False):
            result = json.loads(
                run_client(env, CLIENT, json.dumps(["over", "tls", "as documented"]))
            )
        assert result["shape"] == [3, 384], log.read_text()[-3000:]
        assert PASSWORD not in log.read_text()


def test_a_certificate_for_another_host_is_refused_by_every_client(tmp_path):
    certs = _certificates(tmp_path / "certs", "DNS:redis.other-host.example")
    with tls_redis(tmp_path, certs) as port:
        env = _env(tmp_path, documented_url(port, certs["ca"]))
        outcomes = json.loads(run_client(env, PROBE))
        for client, outcome in outcomes.items():
            assert outcome != "connected", f"{client} accepted a certificate for another host"
            assert "mismatch" in outcome or "doesn't match" in outcome, (client, outcome)
        # The control: the same CA, server and password without the host check connect, so
        # what refused above is the host name check and nothing else.
        import redis

        loose = redis.Redis(
            host="127.0.0.1",
            port=port,
            password=PASSWORD,
            ssl=True,
            ssl_ca_certs=certs["ca"],
            ssl_check_hostname=False,
        )
        assert loose.ping() is True
        loose.close()


def test_tls_options_check_host_names_whenever_they_check_certificates():
    assert connection_tls("redis://h:6379/0") is None
    assert connection_tls("rediss://h:6380/0?ssl_ca_certs=/ca.pem") == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem",
        "ssl_check_hostname": True,
    }
    loose = connection_tls("rediss://h:6380/0?ssl_cert_reqs=none")
    assert loose == {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
