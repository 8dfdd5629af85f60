"""Redis over TLS with a password: a real redis-server, a real worker, a real client."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from embedq.broker.tls import tls_options
from embedq.errors import ConfigurationError
from tests.helpers import embed_in_client, free_port, isolated_env, port_answers, worker

PASSWORD = "tls-" + uuid.uuid4().hex[:12]


def _certificates(folder) -> dict[str, str]:
    """A private CA and a server certificate for 127.0.0.1 that it signed."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    ca, key, crt = folder / "ca.pem", folder / "server.key", folder / "server.pem"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        "server.csr",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        str(ca),
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        str(crt),
    )
    return {"ca": str(ca), "key": str(key), "crt": str(crt)}


def test_rediss_url_with_password_carries_a_whole_embedding_round_trip(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server (Debian package) is not installed")
    certs = _certificates(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            certs["crt"],
            "--tls-key-file",
            certs["key"],
            "--tls-ca-cert-file",
            certs["ca"],
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        if not port_answers(port):
            pytest.fail("redis-server with TLS did not start (built without TLS?)")
        url = (
            f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={certs['ca']}"
        )
        environ = isolated_env(tmp_path, url)
        log = tmp_path / "worker.log"
        with worker(environ, log, ready=False):
            result = embed_in_client(environ, texts=["over", "tls", "please"])
        assert result["shape"] == [3, 384]
        assert PASSWORD not in log.read_text()
    finally:
        server.kill()


def test_tls_options_verify_certificates_unless_told_otherwise():
    import ssl

    assert tls_options("redis://h:6379/0") is None
    assert tls_options("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options("rediss://h/0?ssl_cert_reqs=CERT_NONE&ssl_ca_certs=/ca.pem") == {
        "ssl_cert_reqs": ssl.CERT_NONE,
        "ssl_ca_certs": "/ca.pem",
    }
    with pytest.raises(ConfigurationError, match="ssl_cert_reqs"):
        tls_options("rediss://h/0?ssl_cert_reqs=maybe")
