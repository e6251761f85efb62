"""Operating edd (issue 6): systemd notifications, reload, shutdown, --check, log format,
and the observability endpoints (logs, metrics, health), against a real edd process.

The systemd side is checked without systemd: a test binds the unix datagram socket
that NOTIFY_SOCKET names and reads what edd sends, as systemd would. Tests that
never reach a docker command run without an engine; the others are marked `docker`.
"""

import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import (assert_ok, push, push_until_parked, docker_load_running, EDD, client_context, container_state, curl, docker_cli, fetch,
                      free_port, https_request, image_id, read_response, tls_connect,
                      wait_for)

VERSION = re.search(r'^__version__ = "([^"]+)"', EDD.read_text(), re.M).group(1)
# Image tags of this session only: a push re-creates its archive's tag in the engine,
# and another test session building the same tag would `docker rmi` it (and with it
# the image just loaded) between edd's `docker load` and its `docker tag`.
SESSION = secrets.token_hex(3)
V1, V2 = "edd-test-ops-%s:v1" % SESSION, "edd-test-ops-%s:v2" % SESSION
V1_TEXT, V2_TEXT = "edd ops test v1\n", "edd ops test v2\n"
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def accepts(port):
    """Something accepts TCP connections on 127.0.0.1:port right now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def mark(edd):
    """A position in edd's log; wait_log looks only at what comes after it."""
    return len(edd.log())


def wait_log(edd, pattern, since=0, timeout=10):
    """Wait until edd's log (after `since`) matches `pattern`; return the match."""
    return wait_for(lambda: re.search(pattern, edd.log()[since:]), timeout=timeout,
                    message="%r in edd's log:\n%s" % (pattern, edd.log()[since:]))


def reload_and_wait(edd, config, outcome="reloaded"):
    """Rewrite the config, SIGHUP, and wait for edd's log to say `outcome`."""
    since = mark(edd)
    edd.reload(config)
    return wait_log(edd, outcome, since)


def sigterm(edd, timeout=10):
    """SIGTERM edd; return (exit status, seconds it took to exit)."""
    started = time.monotonic()
    edd.proc.send_signal(signal.SIGTERM)
    try:
        status = edd.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("edd still runs %ss after SIGTERM:\n%s" % (timeout, edd.log()))
    return status, time.monotonic() - started


def assert_json_error(reply, status):
    assert reply.status == status, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    assert isinstance(reply.json, dict) and reply.json.get("error"), reply.body


def deployment_names(edd, cert="alice"):
    reply = https_request(edd, "GET", "/v1/deployments", cert=cert)
    assert reply.status == 200, reply
    return sorted(d["name"] for d in reply.json["deployments"])


def peer_certificate(edd):
    """The DER certificate edd presents to a new connection."""
    with tls_connect(edd) as sock:
        return sock.getpeercert(binary_form=True)


def der(cert_path):
    return ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())


def openssl(*args, cwd):
    proc = subprocess.run(["openssl"] + [str(a) for a in args], cwd=str(cwd),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, "openssl %s: %s" % (" ".join(map(str, args)), proc.stderr)


def issue_server_cert(pki, directory, cn):
    """A new server certificate from the test CA (fresh key and serial, another CN).

    Same SANs as the session's server certificate, so clients still verify it."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, crt, ext = (directory / name for name in ("server.key", "server.csr",
                                                         "server.crt", "server.ext"))
    ext.write_text("[ ext ]\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=%s" % cn, cwd=directory)
    openssl("x509", "-req", "-in", csr, "-CA", pki.ca, "-CAkey", pki.ca_key,
            "-set_serial", "0x%s" % secrets.token_hex(8), "-days", "30", "-sha256",
            "-extfile", ext, "-extensions", "ext", "-out", crt, cwd=directory)
    return crt, key


def replace_file(target, source):
    """Put `source`'s bytes at `target` atomically, as a certificate renewal tool would."""
    staging = target.with_name(target.name + ".new")
    shutil.copyfile(str(source), str(staging))
    os.replace(str(staging), str(target))


# ---------------------------------------------------------------------------
# sd_notify: a stand-in for systemd's notification socket
# ---------------------------------------------------------------------------

class Notification:
    def __init__(self, index, at, text, port_accepted):
        self.index, self.at, self.text = index, at, text
        self.fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        self.port_accepted = port_accepted      # for READY=1: was edd listening by then?

    def __repr__(self):
        return "Notification(%d, %r)" % (self.index, self.text)


class NotifySocket:
    """Binds a unix datagram socket and records every message sent to it."""

    def __init__(self, kind):
        self._dir = None
        if kind == "abstract":
            name = "edd-test-notify-%s" % secrets.token_hex(6)
            address, self.env_value = "\0" + name, "@" + name
        else:
            # A short folder: unix socket paths are limited to 107 bytes.
            self._dir = tempfile.mkdtemp(prefix="edd-notify-", dir="/tmp")
            address = self.env_value = os.path.join(self._dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.probe_port = None
        self.messages = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            # Probe at once, in this thread: READY=1 must mean "already listening".
            probed = None
            if self.probe_port and "READY=1" in text.splitlines():
                probed = accepts(self.probe_port)
            with self._changed:
                self.messages.append(Notification(len(self.messages), time.monotonic(),
                                                  text, probed))
                self._changed.notify_all()

    def wait(self, key, value="1", after=0, timeout=10):
        """The first message from index `after` on that has key=value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages[after:]:
                    if message.fields.get(key) == value:
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no %s=%s from edd within %ss; got %r"
                                         % (key, value, timeout, self.messages))
                self._changed.wait(left)

    def having(self, key, value="1", after=0):
        with self._changed:
            return [m for m in self.messages[after:] if m.fields.get(key) == value]

    def close(self):
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify_socket(monkeypatch):
    """notify_socket(kind) -> a NotifySocket that edd started afterwards will talk to."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    made = []

    def make(kind="path"):
        listener = NotifySocket(kind)
        made.append(listener)
        monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
        return listener
    yield make
    for listener in made:
        listener.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_reloading_stopping(edd_factory, notify_socket, kind):
    notify = notify_socket(kind)
    port = free_port()
    notify.probe_port = port
    edd = edd_factory.start(listen="127.0.0.1:%d" % port)

    ready = notify.wait("READY")
    assert ready.port_accepted, "READY=1 came before edd accepted connections"
    assert ready.fields.get("STATUS"), ready
    assert str(port) in ready.fields["STATUS"], ready
    time.sleep(0.3)
    assert len(notify.having("READY")) == 1, notify.messages

    after = len(notify.messages)
    edd.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait("RELOADING", after=after)
    notify.wait("READY", after=reloading.index + 1)
    wait_log(edd, "reloaded")

    after = len(notify.messages)
    status, seconds = sigterm(edd)
    assert status == 0, edd.log()
    notify.wait("STOPPING", after=after, timeout=1)
    assert not notify.having("READY", after=after), notify.messages


def test_refused_reload_still_ends_with_ready(edd_factory, notify_socket):
    # systemd waits for READY=1 after RELOADING=1 whatever the reload's outcome:
    # a unit left "reloading" would block the next `systemctl reload`.
    notify = notify_socket()
    edd = edd_factory.start()
    notify.wait("READY")
    after = len(notify.messages)
    reload_and_wait(edd, dict(edd.config, listen="not-a-listen-address"), "reload refused")
    reloading = notify.wait("RELOADING", after=after)
    notify.wait("READY", after=reloading.index + 1)
    assert edd.proc.poll() is None


def test_watchdog_pings_at_half_the_interval(edd_factory, notify_socket, monkeypatch):
    notify = notify_socket()
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    edd_factory.start()
    first = notify.wait("WATCHDOG", timeout=5)
    time.sleep(1.5)
    pings = [m.at for m in notify.having("WATCHDOG", after=first.index)]
    # ~15 pings at 0.1 s; the bounds leave room for a busy test machine.
    assert 9 <= len(pings) <= 20, pings
    gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
    median = gaps[len(gaps) // 2]
    assert 0.07 <= median <= 0.14, gaps
    assert gaps[-1] < 0.5, gaps


def test_watchdog_is_not_for_another_pid(edd_factory, notify_socket, monkeypatch):
    # WATCHDOG_PID names the process systemd watches; a child that inherits the
    # variable (edd started from a script) must not ping in its parent's place.
    notify = notify_socket()
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    edd_factory.start()
    notify.wait("READY")
    time.sleep(0.6)
    assert not notify.having("WATCHDOG"), notify.messages


def test_unreachable_notify_socket_is_not_fatal(edd_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    edd = edd_factory.start()
    assert https_request(edd, "GET", "/metrics").status == 200
    status, _ = sigterm(edd)
    assert status == 0, edd.log()


# ---------------------------------------------------------------------------
# SIGHUP: config and TLS files reloaded, bad ones refused
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_reload_adds_and_removes_deployments(edd_factory):
    first = edd_factory.deployment()
    edd = edd_factory.start([first])
    assert deployment_names(edd) == [first.name]

    second = edd_factory.deployment(clients=["bob"])
    reload_and_wait(edd, dict(edd.config, deployments=[first, second]),
                    r"reloaded .* 2 deployments")
    assert deployment_names(edd, "bob") == sorted([first.name, second.name])
    assert deployment_names(edd, "alice") == [first.name]
    assert https_request(edd, "GET", "/v1/deployments/%s" % second.name,
                         cert="bob").json["state"] == "absent"

    reload_and_wait(edd, dict(edd.config, deployments=[second]), r"reloaded .* 1 deployments")
    assert_json_error(https_request(edd, "GET", "/v1/deployments/%s" % first.name,
                                    cert="bob"), 404)
    assert edd.proc.poll() is None


@pytest.mark.docker
def test_reload_leaving_a_client_no_deployments_lists_none(edd_factory):
    # After a reload removes the last deployment a client may use, its list is
    # empty, not an error.
    mine, theirs = edd_factory.deployment(), edd_factory.deployment(clients=["bob"])
    edd = edd_factory.start([mine, theirs])
    assert deployment_names(edd, "alice") == [mine.name]
    reload_and_wait(edd, dict(edd.config, deployments=[theirs]), "reloaded")
    assert deployment_names(edd, "bob") == [theirs.name]
    assert deployment_names(edd, "alice") == []


@pytest.mark.docker
def test_invalid_reload_is_refused_and_the_old_config_kept(edd_factory):
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])
    good = dict(edd.config)

    line = reload_and_wait(edd, dict(good, deployments=[deployment, {"name": "Bad Name"}]),
                           r".*reload refused.*").group(0)
    assert "deployments[1].name" in line, line
    assert str(edd.config_path) in line, line
    assert edd.proc.poll() is None
    assert deployment_names(edd) == [deployment.name]

    # Not JSON at all, then a TLS file that does not exist: refused the same way.
    since = mark(edd)
    edd.config_path.write_text('{"deployments": [')
    edd.proc.send_signal(signal.SIGHUP)
    wait_log(edd, r"reload refused.*not valid JSON", since)
    reload_and_wait(edd, dict(good, server_key=str(edd.config_path.parent / "absent.key")),
                    r"reload refused.*server_key")
    assert edd.proc.poll() is None
    assert deployment_names(edd) == [deployment.name]
    assert "Traceback" not in edd.log()

    # A good config is taken again afterwards.
    reload_and_wait(edd, good, "reloaded")
    assert deployment_names(edd) == [deployment.name]


def test_certificate_rotation_on_sighup(edd_factory, pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"
    shutil.copyfile(str(pki.server_cert), str(cert))
    shutil.copyfile(str(pki.server_key), str(key))
    edd = edd_factory.start(server_cert=str(cert), server_key=str(key))
    assert peer_certificate(edd) == der(pki.server_cert)

    # A keep-alive connection made before the rotation.
    kept = http.client.HTTPSConnection("127.0.0.1", edd.port, timeout=10,
                                       context=client_context(pki))
    kept.request("GET", "/metrics")
    first = kept.getresponse()
    assert first.status == 200 and first.read()

    rotated_cert, rotated_key = issue_server_cert(pki, tmp_path / "rotated", "edd-rotated")
    replace_file(key, rotated_key)
    replace_file(cert, rotated_cert)
    since = mark(edd)
    edd.proc.send_signal(signal.SIGHUP)
    wait_log(edd, "reloaded", since)
    assert peer_certificate(edd) == der(rotated_cert) != der(pki.server_cert)
    # Changed TLS files end the connections made before (issue 11): the kept one
    # is closed, and a new one works.
    with pytest.raises((http.client.HTTPException, OSError)):
        kept.request("GET", "/metrics")
        kept.getresponse()
    kept.close()
    assert https_request(edd, "GET", "/metrics").status == 200

    # A new certificate without its key: refused, the rotated pair stays in use.
    unmatched_cert, _ = issue_server_cert(pki, tmp_path / "unmatched", "edd-unmatched")
    replace_file(cert, unmatched_cert)
    since = mark(edd)
    edd.proc.send_signal(signal.SIGHUP)
    wait_log(edd, r"reload refused.*server_cert/server_key", since)
    assert peer_certificate(edd) == der(rotated_cert)
    assert edd.proc.poll() is None


def test_changed_listen_is_logged_as_needing_a_restart(edd_factory):
    edd = edd_factory.start()
    other_port = free_port()
    line = reload_and_wait(edd, dict(edd.config, listen="127.0.0.1:%d" % other_port),
                           r".*listen.*").group(0)
    assert "restart" in line, line
    assert str(other_port) in line, line
    assert https_request(edd, "GET", "/metrics").status == 200
    assert not accepts(other_port)
    assert edd.proc.poll() is None


def test_listen_change_is_reported_until_edd_restarts(edd_factory):
    # edd still listens on the old address after the first reload, so every later
    # reload must say so too: the warning of the first one may have scrolled away.
    edd = edd_factory.start()
    moved = dict(edd.config, listen="127.0.0.1:%d" % free_port())
    reload_and_wait(edd, moved, "restart")
    since = mark(edd)
    edd.reload(dict(moved, admins=["carol"]))
    wait_log(edd, "reloaded", since)
    assert "restart" in edd.log()[since:], edd.log()[since:]


# ---------------------------------------------------------------------------
# SIGTERM: stop accepting, abort uploads, let a swap finish, exit 0
# ---------------------------------------------------------------------------

def test_sigterm_with_an_idle_connection_exits_at_once(edd_factory):
    edd = edd_factory.start()
    idle = tls_connect(edd)
    try:
        status, seconds = sigterm(edd)
    finally:
        idle.close()
    assert status == 0, edd.log()
    assert seconds < 3, seconds
    assert re.search(r"SIGTERM: shutting down", edd.log()), edd.log()


@pytest.mark.docker
def test_sigterm_aborts_an_upload_and_changes_nothing(edd_factory, make_image):
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])
    assert_ok(push(edd, deployment, make_image(V1, content=V1_TEXT)))
    assert fetch(deployment.port) == V1_TEXT
    v1_id = image_id("edd/%s:current" % deployment.name)
    # A tag of its own: only this upload could create it.
    upload_tag = "edd-test-ops-aborted:%s" % secrets.token_hex(4)
    upload = make_image(upload_tag, content="never deployed %s\n" % upload_tag)

    sock = tls_connect(edd)
    sock.sendall(("POST /v1/deployments/%s/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Content-Type: application/x-tar\r\nTransfer-Encoding: chunked\r\n\r\n"
                  % deployment.name).encode())
    first_part = upload.read_bytes()[:65536]
    sock.sendall(b"%x\r\n%s\r\n" % (len(first_part), first_part))
    wait_for(lambda: docker_load_running(edd),
             message="docker load to start")

    status, seconds = sigterm(edd)
    assert status == 0, edd.log()
    assert seconds < 5, seconds
    try:
        reply = read_response(sock)
    except (OSError, http.client.HTTPException):
        reply = None            # a closed connection is an acceptable abort too
    finally:
        sock.close()
    if reply is not None:
        assert_json_error(reply, 503)

    assert fetch(deployment.port) == V1_TEXT
    assert container_state(deployment.name) == "running"
    assert container_state(deployment.name + ".edd-old") is None
    assert image_id("edd/%s:current" % deployment.name) == v1_id
    assert image_id("edd/%s:previous" % deployment.name) is None
    assert image_id(upload_tag) is None
    assert image_id(make_image.image_id(upload)) is None


@pytest.mark.docker
def test_sigterm_lets_a_swap_under_way_finish(edd_factory, make_image):
    deployment = edd_factory.deployment(settle_seconds=3)
    edd = edd_factory.start([deployment])
    v1, v2 = make_image(V1, content=V1_TEXT), make_image(V2, content=V2_TEXT)
    assert_ok(push(edd, deployment, v1))
    assert fetch(deployment.port) == V1_TEXT

    pusher, replies = push_until_parked(edd, deployment, v2)
    edd.proc.send_signal(signal.SIGTERM)
    # The port closes at once, while the swap goes on behind the 3 s gate.
    wait_for(lambda: not accepts(edd.port), timeout=2, interval=0.05,
             message="edd to stop accepting connections")
    assert edd.proc.poll() is None, "edd exited before the swap finished:\n" + edd.log()

    status = edd.proc.wait(30)
    assert status == 0, edd.log()
    pusher.join(30)
    assert replies and replies[0].status == 200, replies
    assert fetch(deployment.port) == V2_TEXT
    assert container_state(deployment.name + ".edd-old") is None
    assert image_id("edd/%s:current" % deployment.name) == make_image.image_id(v2)
    assert image_id("edd/%s:previous" % deployment.name) == make_image.image_id(v1)


# ---------------------------------------------------------------------------
# The command line: --check (like nginx -t) and --version
# ---------------------------------------------------------------------------

def run_edd(*args):
    return subprocess.run([sys.executable, str(EDD)] + list(args), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def write_config(tmp_path, pki, **settings):
    config = {"listen": "127.0.0.1:%d" % free_port(), "server_cert": str(pki.server_cert),
              "server_key": str(pki.server_key), "client_ca": str(pki.ca),
              "deployments": [{"name": "checked-app", "args": ["-p", "127.0.0.1:1:8000"]}]}
    config.update(settings)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def assert_one_error_line(done, *expected):
    assert done.returncode == 1, done
    assert done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edd: error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.docker
def test_check_valid_config(tmp_path, pki, docker):
    path = write_config(tmp_path, pki)
    done = run_edd("--check", "--config", path)
    assert done.returncode == 0, done
    assert done.stderr == "", done.stderr
    assert len(done.stdout.splitlines()) == 1, done.stdout
    assert path in done.stdout


@pytest.mark.parametrize("settings, key", [
    ({"deployments": [{"name": "Web"}]}, "deployments[0].name"),
    ({"listen": "8866"}, "listen"),
    ({"deployments": [{"name": "web", "settle_seconds": "soon"}]},
     "deployments[0].settle_seconds"),
    ({"server_cert": "/nonexistent/server.crt"}, "server_cert"),
], ids=["name", "listen", "settle", "missing-cert"])
def test_check_bad_config_names_the_key(tmp_path, pki, settings, key):
    path = write_config(tmp_path, pki, **settings)
    assert_one_error_line(run_edd("--check", "--config", path), path, key)


def test_check_unreadable_config_file(tmp_path):
    path = str(tmp_path / "absent.json")
    assert_one_error_line(run_edd("--check", "--config", path), path)
    (tmp_path / "broken.json").write_text("{")
    path = str(tmp_path / "broken.json")
    assert_one_error_line(run_edd("--check", "--config", path), path)


def test_check_key_of_another_certificate(tmp_path, pki):
    _, alice_key = pki.client("alice")
    path = write_config(tmp_path, pki, server_key=str(alice_key))
    assert_one_error_line(run_edd("--check", "--config", path), "server_cert/server_key")


def test_check_client_ca_that_is_not_a_certificate(tmp_path, pki):
    path = write_config(tmp_path, pki, client_ca=str(pki.server_key))
    assert_one_error_line(run_edd("--check", "--config", path), "client_ca")


# The real engine cannot be made to stop answering for one process only, so a
# stand-in docker CLI plays the engine that does not answer: one that fails, and
# one that does not exist.
@pytest.mark.parametrize("docker_cli_path", ["/bin/false", "/nonexistent/docker"])
def test_check_docker_not_answering(tmp_path, pki, docker_cli_path):
    path = write_config(tmp_path, pki, docker=docker_cli_path)
    assert_one_error_line(run_edd("--check", "--config", path), "docker")


def test_version_flag():
    done = run_edd("--version")
    assert done.returncode == 0, done
    assert done.stdout.strip() == "edd " + VERSION


# ---------------------------------------------------------------------------
# Log format: journald's or a terminal's
# ---------------------------------------------------------------------------

def test_journal_stream_lines_carry_priority_and_no_time(edd_factory, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    edd = edd_factory.start()
    assert https_request(edd, "GET", "/metrics").status == 200
    wait_log(edd, "request id=")
    good = dict(edd.config)
    reload_and_wait(edd, dict(good, listen="127.0.0.1:%d" % free_port()), "restart")
    reload_and_wait(edd, dict(good, deployments="none"), "reload refused")
    status, _ = sigterm(edd)
    assert status == 0

    lines = edd.log().splitlines()
    assert lines, "no log at all"
    for line in lines:
        assert re.match(r"<[0-7]>\S", line), line
        assert not TIMESTAMP_RE.search(line), line
    def prefix_of(text):
        return next(line[:3] for line in lines if text in line)
    assert prefix_of("listening on https://") == "<6>"
    assert prefix_of("request id=") == "<6>"
    assert prefix_of("restart") == "<4>"
    assert prefix_of("reload refused") == "<3>"


def test_without_journal_stream_lines_start_with_a_timestamp(edd_factory, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    edd = edd_factory.start()
    assert https_request(edd, "GET", "/metrics").status == 200
    wait_log(edd, "request id=")
    lines = edd.log().splitlines()
    assert lines
    for line in lines:
        assert TIMESTAMP_RE.match(line), line
        assert not line.startswith("<"), line


# ---------------------------------------------------------------------------
# Observability: container logs, metrics, health
# ---------------------------------------------------------------------------

CHATTY_LINES = ["chatty line %d" % n for n in range(1, 9)]
CHATTY_CMD = ["/bin/busybox", "sh", "-c",
              "for n in 1 2 3 4 5 6 7 8; do echo chatty line $n; done; "
              "trap 'exit 0' TERM; /bin/busybox httpd -f -p 8000 -h /www & wait"]


def text_lines(reply):
    # docker run -it gives the container a terminal: its lines end with \r\n.
    return [line.rstrip("\r") for line in reply.body.splitlines()]


@pytest.mark.docker
def test_logs_endpoint(edd_factory, make_image):
    deployment = edd_factory.deployment(clients=["alice"])
    edd = edd_factory.start([deployment])
    chatty = make_image("edd-test-ops-chatty-%s:v1" % SESSION, content="chatty\n",
                        cmd=CHATTY_CMD)
    assert_ok(push(edd, deployment, chatty))
    path = "/v1/deployments/%s/logs" % deployment.name

    reply = wait_for(lambda: (lambda r: r.status == 200 and "chatty line 8" in r.body and r)(
        https_request(edd, "GET", path + "?tail=5")), message="the container's output")
    assert reply.headers["content-type"].startswith("text/plain"), reply.headers
    assert text_lines(reply) == CHATTY_LINES[-5:], reply.body
    assert text_lines(https_request(edd, "GET", path)) == CHATTY_LINES
    alias = https_request(edd, "GET", "/v1/%s/logs?tail=2" % deployment.name)
    assert text_lines(alias) == CHATTY_LINES[-2:], alias.body

    for tail in ("0", "-1", "10001", "five", "", "2&tail=3"):
        reply = https_request(edd, "GET", path + "?tail=" + tail)
        assert_json_error(reply, 400)
        assert "tail" in reply.json["error"], reply.json

    assert_json_error(https_request(edd, "GET", path, cert="bob"), 404)
    assert_json_error(https_request(edd, "GET", "/v1/deployments/not-configured/logs"), 404)
    assert curl(edd, "GET", path, cert=None).status == 0     # no certificate, no answer


SAMPLE_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: -?[0-9]+)?\Z")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
METRIC_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def parse_exposition(text):
    """Check Prometheus' text format line by line; return {(name, labels): value}.

    labels is a sorted tuple of (key, value). Every sample must belong to a family
    whose # TYPE came before it; an AssertionError names the first bad line."""
    assert text.endswith("\n"), "exposition must end with a newline"
    samples, types = {}, {}
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d: %r" % (number, line)
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) > 1 and parts[1] in ("HELP", "TYPE"):
                assert len(parts) == 4 and re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z",
                                                    parts[2]), where
                if parts[1] == "TYPE":
                    assert parts[3] in METRIC_TYPES, where
                    assert parts[2] not in types, "second TYPE, " + where
                    types[parts[2]] = parts[3]
            continue
        match = SAMPLE_RE.match(line)
        assert match, where
        name, label_text, value = match.groups()
        labels, rest = [], label_text or ""
        while rest:
            label = LABEL_RE.match(rest)
            assert label, "bad labels, " + where
            labels.append(label.group(1, 2))
            rest = rest[label.end():]
        assert len(set(k for k, _ in labels)) == len(labels), "repeated label, " + where
        float(value)        # ValueError for anything that is not a sample value
        family = re.sub(r"_(bucket|sum|count)\Z", "", name)
        assert name in types or types.get(family) == "histogram", "no TYPE before " + where
        key = (name, tuple(sorted(labels)))
        assert key not in samples, "repeated sample, " + where
        samples[key] = float(value)
    return samples


def metric(samples, name, **labels):
    """The value of the sample `name` with exactly `labels`, or None."""
    return samples.get((name, tuple(sorted(labels.items()))))


def test_exposition_parser_rejects_what_prometheus_would():
    assert parse_exposition('# TYPE a counter\na{b="c"} 1\n') == {("a", (("b", "c"),)): 1.0}
    for bad in ('# TYPE a counter\na{b=c} 1\n', '# TYPE a counter\na 1 2 3\n',
                'a 1\n', '# TYPE a counter\na{b="c"} one\n', '# TYPE a counter\na 1'):
        with pytest.raises((AssertionError, ValueError)):
            parse_exposition(bad)


@pytest.mark.docker
def test_metrics_after_a_deploy_and_a_restore(edd_factory, make_image):
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])
    good = make_image(V1, content=V1_TEXT)
    failing = make_image("edd-test-ops-exits-%s:v1" % SESSION, exits=True)
    assert_ok(push(edd, deployment, good))
    restored = push(edd, deployment, failing)
    assert restored.status == 502 and restored.json.get("restored") is True, restored
    assert fetch(deployment.port) == V1_TEXT

    reply = https_request(edd, "GET", "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain"), reply.headers
    samples = parse_exposition(reply.body)
    name = deployment.name

    assert metric(samples, "edd_deploys_total", deployment=name, action="load",
                  outcome="deployed") == 1, reply.body
    assert metric(samples, "edd_deploys_total", deployment=name, action="load",
                  outcome="restored") == 1, reply.body
    assert metric(samples, "edd_restores_total", deployment=name) == 1, reply.body
    assert metric(samples, "edd_upload_bytes_total", deployment=name) == \
        good.stat().st_size + failing.stat().st_size, reply.body
    assert metric(samples, "edd_requests_total", status="200") >= 1, reply.body
    assert metric(samples, "edd_requests_total", status="502") >= 1, reply.body
    assert metric(samples, "edd_build_info", version=VERSION,
                  python=platform.python_version()) == 1, reply.body

    buckets = sorted((float(dict(labels)["le"]), value)
                     for (metric_name, labels), value in samples.items()
                     if metric_name == "edd_deploy_duration_seconds_bucket"
                     and dict(labels).get("deployment") == name)
    assert buckets and buckets[-1][0] == float("inf"), reply.body
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), "buckets must be cumulative: %r" % buckets
    assert counts[-1] == 2
    assert metric(samples, "edd_deploy_duration_seconds_count", deployment=name) == 2
    total = metric(samples, "edd_deploy_duration_seconds_sum", deployment=name)
    assert total is not None and total > 0, reply.body

    assert curl(edd, "GET", "/metrics", cert=None).status == 0   # behind mTLS too

    # Rollbacks are counted as deploys of their own kind.
    assert_ok(push(edd, deployment, make_image(V2, content=V2_TEXT)))
    assert_ok(curl(edd, "POST", "/v1/deployments/%s/rollback" % name))
    assert fetch(deployment.port) == V1_TEXT
    samples = parse_exposition(https_request(edd, "GET", "/metrics").body)
    assert metric(samples, "edd_deploys_total", deployment=name, action="rollback",
                  outcome="deployed") == 1
    assert metric(samples, "edd_deploys_total", deployment=name, action="load",
                  outcome="deployed") == 2
    assert metric(samples, "edd_deploy_duration_seconds_count", deployment=name) == 4


@pytest.mark.docker
def test_health_reports_docker(edd_factory, docker):
    edd = edd_factory.start()
    server_version = docker_cli("version", "--format", "{{.Server.Version}}").stdout.strip()
    reply = https_request(edd, "GET", "/v1/health")
    assert reply.status == 200, reply
    assert reply.json["status"] == "ok", reply.json
    assert reply.json["docker"] == server_version, reply.json
    assert reply.json["edd"] == VERSION, reply.json

    # A reload that points edd at a docker CLI that fails turns health to 503.
    reload_and_wait(edd, dict(edd.config, docker="/bin/false"))
    assert_json_error(https_request(edd, "GET", "/v1/health"), 503)


def test_health_is_503_when_docker_fails(edd_factory):
    # A stand-in docker: the real engine cannot be made to fail for one process.
    edd = edd_factory.start(docker="/bin/false")
    reply = https_request(edd, "GET", "/v1/health")
    assert_json_error(reply, 503)
    assert "docker" in reply.json["error"], reply.json
