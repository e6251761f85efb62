"""The Makefile: `make install` / `make uninstall` into a temporary DESTDIR,
`make certs` in a scratch directory, and config.example.json.

These run the real Makefile with the real `install`, `sed` and `openssl`;
nothing here needs Docker or root.
"""

import json
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make(*args, cwd=REPO):
    """Run make with args in cwd; fail the test with make's output if it fails."""
    proc = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=str(cwd),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
    )
    assert proc.returncode == 0, "make {} failed:\n{}".format(" ".join(args), proc.stdout)
    return proc.stdout


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def unit_value(unit_text, key):
    """The value of the last `key=` line of a unit file, or None."""
    values = [line.split("=", 1)[1] for line in unit_text.splitlines()
              if line.startswith(key + "=")]
    return values[-1] if values else None


# ---------------------------------------------------------------- install

@pytest.fixture
def destdir(tmp_path):
    root = tmp_path / "root"
    make("install", "DESTDIR={}".format(root), "PREFIX=/usr/local")
    return root


def test_install_puts_program_unit_and_config_in_place(destdir):
    program = destdir / "usr/local/bin/edd"
    unit = destdir / "lib/systemd/system/edd.service"
    config = destdir / "etc/edd/config.json"

    assert program.read_bytes() == (REPO / "edd.py").read_bytes()
    assert program.read_text().startswith("#!/usr/bin/env python3\n")
    assert mode(program) == 0o755
    assert mode(unit) == 0o644
    assert mode(config) == 0o640
    assert mode(config.parent) == 0o750

    unit_text = unit.read_text()
    assert unit_value(unit_text, "ExecStart") == "/usr/local/bin/edd --config /etc/edd/config.json"


def test_installed_config_is_the_example_with_production_values(destdir):
    installed = json.loads((destdir / "etc/edd/config.json").read_text())
    example = json.loads((REPO / "config.example.json").read_text())

    # The documented defaults: listen everywhere, TLS files in /etc/edd.
    assert installed["listen"] == "0.0.0.0:8866"
    assert installed["server_cert"] == "/etc/edd/server.crt"
    assert installed["server_key"] == "/etc/edd/server.key"
    assert installed["client_ca"] == "/etc/edd/ca.crt"
    # Swap records where the unit's StateDirectory= makes them survive a reboot.
    assert installed["state_dir"] == "/var/lib/edd"
    assert installed["deployments"] == example["deployments"]
    assert set(installed) == set(example)


def test_install_honours_prefix(tmp_path):
    root = tmp_path / "root"
    make("install", "DESTDIR={}".format(root), "PREFIX=/usr")

    assert (root / "usr/bin/edd").is_file()
    assert not (root / "usr/local").exists()
    unit_text = (root / "lib/systemd/system/edd.service").read_text()
    assert unit_value(unit_text, "ExecStart") == "/usr/bin/edd --config /etc/edd/config.json"


def test_install_never_overwrites_an_existing_config(destdir):
    config = destdir / "etc/edd/config.json"
    edited = config.read_text().replace("0.0.0.0:8866", "0.0.0.0:9999")
    config.write_text(edited)
    config.chmod(0o600)

    output = make("install", "DESTDIR={}".format(destdir), "PREFIX=/usr/local")

    assert "keeping existing" in output
    assert config.read_text() == edited
    assert mode(config) == 0o600


def test_uninstall_removes_program_and_unit_but_keeps_etc_edd(destdir):
    (destdir / "etc/edd/server.key").write_text("operator's key\n")

    make("uninstall", "DESTDIR={}".format(destdir), "PREFIX=/usr/local")

    assert not (destdir / "usr/local/bin/edd").exists()
    assert not (destdir / "lib/systemd/system/edd.service").exists()
    assert (destdir / "etc/edd/config.json").is_file()
    assert (destdir / "etc/edd/server.key").read_text() == "operator's key\n"


# ---------------------------------------------------------------- config.example.json

def test_example_config_serves_the_dev_pki_on_localhost():
    example = json.loads((REPO / "config.example.json").read_text())

    assert example["listen"] == "127.0.0.1:8866"
    # Relative paths: edd resolves them against the config file's directory,
    # which is where `make certs` puts pki/.
    assert example["server_cert"] == "pki/server.crt"
    assert example["server_key"] == "pki/server.key"
    assert example["client_ca"] == "pki/ca.crt"
    # `make run` keeps its swap records beside the config: no root needed.
    assert example["state_dir"] == "state"
    # --init: docker's tiny init forwards SIGTERM, so busybox httpd (which as
    # PID 1 ignores it) stops at once on a redeploy instead of after 10 s.
    assert example["deployments"] == [
        {"name": "website", "args": ["--init", "-p", "127.0.0.1:8080:8000"]},
    ]


def test_make_run_uses_the_example_config():
    dry_run = make("-n", "run", "PYTHON=python3", "PKI=/nonexistent/pki-not-made")
    assert "python3 edd.py --config config.example.json" in dry_run.splitlines()


# ---------------------------------------------------------------- make certs

@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory):
    """`make certs` run in a scratch directory holding a copy of the Makefile."""
    workdir = tmp_path_factory.mktemp("certs")
    shutil.copy(str(REPO / "Makefile"), str(workdir / "Makefile"))
    make("certs", cwd=workdir)
    return workdir / "pki"


def openssl(*args):
    proc = subprocess.run(["openssl", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    return proc.returncode, proc.stdout


def test_certs_makes_ca_server_and_client_with_private_keys(dev_pki):
    names = sorted(p.name for p in dev_pki.iterdir())
    assert names == ["ca.crt", "ca.key", "client.crt", "client.key", "server.crt", "server.key"]
    for key in ("ca.key", "server.key", "client.key"):
        assert mode(dev_pki / key) == 0o600, key


def test_certs_is_idempotent(dev_pki):
    before = {p.name: p.read_bytes() for p in dev_pki.iterdir()}
    output = make("certs", cwd=dev_pki.parent)
    assert "openssl" not in output
    assert {p.name: p.read_bytes() for p in dev_pki.iterdir()} == before


def test_client_cert_is_for_client_auth_only(dev_pki):
    ca, client = str(dev_pki / "ca.crt"), str(dev_pki / "client.crt")
    assert openssl("verify", "-CAfile", ca, "-purpose", "sslclient", client)[0] == 0
    assert openssl("verify", "-CAfile", ca, "-purpose", "sslserver", client)[0] != 0
    _, subject = openssl("x509", "-in", client, "-noout", "-subject")
    assert "CN = dev-client" in subject or "CN=dev-client" in subject


def test_server_cert_names_localhost_and_127_0_0_1(dev_pki):
    ca, server = str(dev_pki / "ca.crt"), str(dev_pki / "server.crt")
    assert openssl("verify", "-CAfile", ca, "-purpose", "sslserver", server)[0] == 0
    assert openssl("verify", "-CAfile", ca, "-purpose", "sslclient", server)[0] != 0
    _, text = openssl("x509", "-in", server, "-noout", "-text")
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text


def test_dev_pki_does_mutual_tls_with_python_defaults(dev_pki):
    """What edd and the tests do: default contexts (strict X.509 checks on
    Python 3.13+), the client cert required, the server checked by name."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                                cafile=str(dev_pki / "ca.crt"))
    server_context.load_cert_chain(str(dev_pki / "server.crt"), str(dev_pki / "server.key"))
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.create_default_context(cafile=str(dev_pki / "ca.crt"))
    client_context.load_cert_chain(str(dev_pki / "client.crt"), str(dev_pki / "client.key"))

    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)
    seen = {}

    def serve():
        try:
            with server_context.wrap_socket(server_sock, server_side=True) as tls:
                seen["subject"] = dict(rdn[0] for rdn in tls.getpeercert()["subject"])
                tls.sendall(b"ok")
        except Exception as error:  # reported by the assertion below
            seen["error"] = error

    thread = threading.Thread(target=serve)
    thread.start()
    with client_context.wrap_socket(client_sock, server_hostname="localhost") as tls:
        assert tls.recv(2) == b"ok"
    thread.join(10)
    assert "error" not in seen, seen.get("error")
    assert seen["subject"]["commonName"] == "dev-client"
