"""Issue 4, end to end: who may deploy what, hostile clients, limits, audit trail.

Every test runs against a real edd process. Where a rule is about the host,
the test asks what the deployment's published port serves and which
containers and images exist afterwards; a status code alone proves nothing.

Sections follow the issue: authorization, limits, timeouts, paths, framing,
certificates, audit, and a bounded fuzz test (live server and in-process).
"""

import concurrent.futures
import datetime
import email.message
import io
import json
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from conftest import (push, docker_load_running, read_all, client_context, curl, docker_cli, fetch, https_request, read_response,
                      run_tag, tls_connect, unreachable, wait_for)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import edd as eddpy  # noqa: E402  (the module under test, for the in-process fuzz)

V1, V1_TEXT = run_tag("edd-security-site"), "edd security site v1\n"
# Never successfully loaded by any test here: after a refused push its tag must not exist.
NEVER, NEVER_TEXT = run_tag("edd-security-never", "v2"), "edd security: never served\n"
BIG, BIG_TEXT = run_tag("edd-security-big"), "big " * (3 << 18)     # a ~5 MiB archive


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def start_deployed(edd_factory, make_image, settings=None, others=(), cert="alice",
                   **toplevel):
    """An edd whose first deployment already serves V1 (pushed by `cert`)."""
    deployment = edd_factory.deployment(**(settings or {}))
    edd = edd_factory.start([deployment] + list(others), **toplevel)
    reply = push(edd, deployment, make_image(V1, content=V1_TEXT), cert=cert)
    assert reply.status == 200, reply
    assert fetch(deployment.port) == V1_TEXT
    return edd, deployment


def host_state(name):
    """What exists on the host for deployment `name`: its containers and edd/NAME images.

    The container part includes StartedAt, so a stop, restart or swap shows up."""
    containers = {}
    for container in (name, name + ".edd-old"):
        proc = docker_cli("inspect", "--type", "container", "--format",
                          "{{.State.Status}} {{.State.StartedAt}} {{.Image}}", container,
                          check=False)
        containers[container] = proc.stdout.strip() if proc.returncode == 0 else None
    images = docker_cli("images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}",
                        "edd/%s" % name).stdout.split("\n")
    return containers, sorted(line for line in images if line.strip())


def image_exists(ref):
    return docker_cli("image", "inspect", ref, check=False).returncode == 0


def assert_untouched(edd, deployment, before, text=V1_TEXT):
    """No docker load left running, the page still served, containers and tags as before."""
    wait_for(lambda: not docker_load_running(edd), timeout=15, message="docker load to end")
    assert fetch(deployment.port) == text
    assert host_state(deployment.name) == before


def assert_json_error(reply, *statuses):
    assert reply.status in statuses, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    assert isinstance(reply.json, dict) and reply.json.get("error"), reply


def head(method, path, *lines):
    """A request head (bytes) with Host and the given header lines."""
    text = "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method, path)
    text += "".join(line + "\r\n" for line in lines) + "\r\n"
    return text.encode("latin-1")


def exchange(edd, data, cert="alice", timeout=10):
    """Send raw bytes over mutual TLS and read one response (send errors are ignored:
    the server may answer and close before it has read everything)."""
    sock = tls_connect(edd, cert, timeout)
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass
        return read_response(sock)
    finally:
        sock.close()


def closed_by_server(sock, timeout=5):
    """True when the server closes (EOF or reset) within `timeout` without sending more."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


FIELD_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?:\s+|\Z)')


def parse_fields(text):
    """key=value pairs of a log line; quoted values are JSON strings. Fail if unparseable."""
    fields, position, text = {}, 0, text.strip()
    while position < len(text):
        match = FIELD_RE.match(text, position)
        assert match, "audit line not key=value at %r: %r" % (text[position:], text)
        key, value = match.groups()
        fields[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return fields


def audit_lines(edd):
    return [parse_fields(m.group(1)) for m in re.finditer(r"\baudit (id=.*)$", edd.log(), re.M)]


def wait_audit(edd, where=None, **expected):
    """The first audit line (as a dict) whose fields include `expected` (and that
    satisfies where(fields), if given)."""
    expected = {key: str(value) for key, value in expected.items()}

    def find():
        for fields in audit_lines(edd):
            if all(fields.get(key) == value for key, value in expected.items()) and \
                    (where is None or where(fields)):
                return fields
        return None
    return wait_for(find, timeout=10, message="audit line with %s" % expected)


def names_listed(edd, cert):
    reply = https_request(edd, "GET", "/v1/deployments", cert=cert)
    assert reply.status == 200, reply
    return {d["name"] for d in reply.json["deployments"]}


@pytest.fixture
def v1(make_image):
    return make_image(V1, content=V1_TEXT)


@pytest.fixture
def never(make_image):
    return make_image(NEVER, content=NEVER_TEXT)


# ---------------------------------------------------------------------------
# Authorization by certificate identity
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_clients_restrict_a_deployment_to_named_identities(edd_factory, make_image, never,
                                                           tmp_path):
    # bob's certificate: CN=bob, DNS:bob.example, email:bob@example.com.
    open_one = edd_factory.deployment()
    edd, deployment = start_deployed(edd_factory, make_image, {"clients": ["dns:bob.example"]},
                                     others=[open_one], cert="bob")
    name = deployment.name
    before = host_state(name)

    # bob may read it and sees it listed; alice sees only the open deployment.
    assert https_request(edd, "GET", "/v1/deployments/%s" % name, cert="bob").status == 200
    assert name in names_listed(edd, "bob")
    assert names_listed(edd, "alice") == {open_one.name}

    # alice: 404 for everything about it, canonical and alias paths alike: exactly
    # what an unknown deployment answers, so names cannot be probed.
    for method, path in [("GET", "/v1/deployments/%s"), ("GET", "/v1/deployments/%s/logs"),
                         ("POST", "/v1/deployments/%s/start"), ("POST", "/v1/%s/stop"),
                         ("POST", "/v1/deployments/%s/stop"),
                         ("POST", "/v1/deployments/%s/restart"),
                         ("POST", "/v1/deployments/%s/rollback"),
                         ("DELETE", "/v1/deployments/%s")]:
        assert_json_error(https_request(edd, method, path % name), 404)
    assert_json_error(push(edd, deployment, never), 404)
    assert_json_error(push(edd, deployment, never, chunked=False), 404)
    assert_untouched(edd, deployment, before)
    assert not image_exists(NEVER), "a refused upload was loaded into docker"

    # Each refused change is audited with alice as the client.
    for action in ("start", "stop", "restart", "rollback", "delete", "load"):
        fields = wait_audit(edd, client="alice", deployment=name, action=action, status=404)
        assert fields["refused"] == "not-allowed" and "identity" not in fields, fields

    # bob may change it: stop really stops it.
    assert curl(edd, "POST", "/v1/deployments/%s/stop" % name, cert="bob").status == 200
    assert unreachable(deployment.port)


@pytest.mark.docker
def test_refused_upload_is_never_read(edd_factory, make_image, tmp_path):
    """curl -T with Expect: 100-continue: the 404 comes at once, no 100 Continue first."""
    edd, deployment = start_deployed(edd_factory, make_image, {"clients": ["dns:bob.example"]},
                                     cert="bob")
    before = host_state(deployment.name)
    large = tmp_path / "large.tar"
    with open(str(large), "wb") as sparse:
        sparse.truncate(64 << 20)
    reply = push(edd, deployment, large, chunked=False, headers=["Expect: 100-continue"],
                 extra=["-v"])
    assert_json_error(reply, 404)
    assert "HTTP/1.1 100" not in reply.stderr, reply.stderr
    # curl sends the body anyway after 1 s without an answer (its expect timeout).
    assert reply.elapsed < 0.9, reply.elapsed

    # The same by hand: the head alone gets the 404, and edd closes the connection
    # rather than read 64 MiB it was never going to use.
    sock = tls_connect(edd)
    sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name,
                      "Content-Length: %d" % (64 << 20), "Expect: 100-continue"))
    sock.settimeout(5)
    reply = read_response(sock)
    assert_json_error(reply, 404)
    assert closed_by_server(sock)
    sock.close()

    audit = wait_audit(edd, client="alice", deployment=deployment.name, action="load",
                       status=404)
    assert audit.get("bytes", "0") == "0", audit
    assert_untouched(edd, deployment, before)


@pytest.mark.docker
@pytest.mark.parametrize("clients, allowed, refused", [
    (["email:bob@example.com"], "bob", "alice"),  # email SAN
    (["dns:bob.example"], "bob", "alice"),        # DNS SAN
    (["alice"], "alice", "bob"),                  # subject CN
    (["bob"], "bob", "alice"),                    # subject CN of a cert that also has SANs
], ids=["email-san", "dns-san", "cn", "cn-with-sans"])
def test_identity_matches_cn_or_san(edd_factory, clients, allowed, refused):
    deployment = edd_factory.deployment(clients=clients)
    open_one = edd_factory.deployment()
    edd = edd_factory.start([deployment, open_one])
    path = "/v1/deployments/%s" % deployment.name
    reply = https_request(edd, "GET", path, cert=allowed)
    assert reply.status == 200 and reply.json["state"] == "absent", reply
    assert deployment.name in names_listed(edd, allowed)
    assert_json_error(https_request(edd, "GET", path, cert=refused), 404)
    assert_json_error(https_request(edd, "POST", path + "/start", cert=refused), 404)
    assert names_listed(edd, refused) == {open_one.name}


@pytest.mark.docker
def test_identities_match_exactly(edd_factory):
    # Near misses of bob's identities: no suffix, wildcard, prefix or "type:" matching.
    # A SAN written bare is a CN, and a kind never matches another kind's value.
    near = ["example.com", "*.example", "bob.exampl", "ob.example", "CN=bob",
            "bob.example", "bob@example.com", "dns:*.example", "dns:bob@example.com",
            "email:bob.example", "dns:example", "email:bob@example", "dns:bob"]
    deployment = edd_factory.deployment(clients=near)
    open_one = edd_factory.deployment()
    edd = edd_factory.start([deployment, open_one])
    assert_json_error(https_request(edd, "GET", "/v1/deployments/%s" % deployment.name,
                                    cert="bob"), 404)
    assert names_listed(edd, "bob") == {open_one.name}


@pytest.mark.docker
def test_list_with_no_usable_deployment_is_empty(edd_factory):
    # A client that may use nothing gets an empty list, not an error.
    deployment = edd_factory.deployment(clients=["dns:bob.example"])
    edd = edd_factory.start([deployment])
    reply = https_request(edd, "GET", "/v1/deployments", cert="alice")
    assert reply.status == 200, reply
    assert reply.json == {"deployments": []}


@pytest.mark.docker
def test_admins_may_use_every_deployment(edd_factory, make_image):
    deployment = edd_factory.deployment(clients=["dns:bob.example"])
    other = edd_factory.deployment(clients=["nobody"])
    edd = edd_factory.start([deployment, other], admins=["alice"])
    assert names_listed(edd, "alice") == {deployment.name, other.name}
    assert names_listed(edd, "bob") == {deployment.name}
    reply = push(edd, deployment, make_image(V1, content=V1_TEXT), cert="alice")
    assert reply.status == 200, reply
    assert fetch(deployment.port) == V1_TEXT
    assert_json_error(https_request(edd, "GET", "/v1/deployments/%s" % other.name,
                                    cert="bob"), 404)
    wait_audit(edd, client="alice", deployment=deployment.name, action="load", status=200)


# ---------------------------------------------------------------------------
# Limits: upload size, header count and size
# ---------------------------------------------------------------------------

@pytest.fixture
def limited(edd_factory, make_image, v1):
    """An edd serving V1 whose max_upload_bytes is just above the V1 archive."""
    limit = v1.stat().st_size + 4096
    edd, deployment = start_deployed(edd_factory, make_image, max_upload_bytes=limit)
    big = make_image(BIG, content=BIG_TEXT)
    assert big.stat().st_size > 2 * limit
    return edd, deployment, limit, big


@pytest.mark.docker
def test_content_length_above_limit_is_413_before_reading(limited):
    edd, deployment, limit, big = limited
    before = host_state(deployment.name)
    sock = tls_connect(edd)
    sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name,
                      "Content-Length: %d" % (limit + 1), "Expect: 100-continue"))
    sock.settimeout(5)
    reply = read_response(sock)        # no 100 Continue: http.client would choke on it
    assert_json_error(reply, 413)
    assert closed_by_server(sock)
    sock.close()
    audit = wait_audit(edd, client="alice", deployment=deployment.name, action="load",
                       status=413)
    assert audit.get("bytes", "0") == "0", audit

    reply = push(edd, deployment, big, chunked=False)
    assert_json_error(reply, 413)
    assert_untouched(edd, deployment, before)
    assert not image_exists(BIG)


@pytest.mark.docker
def test_chunked_upload_crossing_limit_is_cut_off(limited):
    edd, deployment, limit, big = limited
    before = host_state(deployment.name)
    reply = push(edd, deployment, big)         # curl -T -: chunked
    # 413, or the connection cut right after the 413 while curl was still sending
    # (curl then reports the last status it saw: none, or the 100 Continue).
    assert reply.status == 413 or (reply.status in (0, 100) and reply.returncode != 0), reply
    if reply.json is not None:      # the reset may also cut the 413's body short
        assert_json_error(reply, 413)
    audit = wait_audit(edd, client="alice", deployment=deployment.name, action="load",
                       status=413)
    assert int(audit.get("bytes", "0")) <= limit, audit
    assert_untouched(edd, deployment, before)
    assert not image_exists(BIG), "docker load was not killed: the image got loaded"

    # A single chunk that declares more than the limit is refused before its data.
    sock = tls_connect(edd)
    sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name,
                      "Transfer-Encoding: chunked") + b"%x\r\n" % (limit + 1))
    sock.settimeout(5)
    assert_json_error(read_response(sock), 413)
    sock.close()
    assert_untouched(edd, deployment, before)


@pytest.mark.parametrize("extra, statuses", [
    (["X-Many-%d: %d" % (n, n) for n in range(150)], (431,)),
    (["X-Long: " + "a" * (70 << 10)], (431, 400)),
], ids=["too-many-headers", "header-line-over-64k"])
def test_header_limits(edd_factory, extra, statuses):
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])
    reply = exchange(edd, head("GET", "/v1/deployments", *extra))
    assert_json_error(reply, *statuses)
    # edd stays up and serves the next client at once.
    assert https_request(edd, "GET", "/v1/deployments", timeout=5).status == 200
    assert edd.proc.poll() is None


# ---------------------------------------------------------------------------
# Timeouts: silent, trickling and stalled clients
# ---------------------------------------------------------------------------

FAST = {"handshake_timeout_seconds": 1, "header_timeout_seconds": 1, "body_timeout_seconds": 1}


def trickle(sock, payload, interval=0.3, give_up=8.0):
    """Send `payload` a byte every `interval` s; return (seconds until the server
    dropped us, what it sent before), or (None, ...) if it never did."""
    started, received = time.monotonic(), b""
    for index in range(len(payload)):
        try:
            sock.send(payload[index:index + 1])
        except OSError:
            return time.monotonic() - started, received
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                data = sock.recv(65536)
            except (OSError, ssl.SSLError):
                return time.monotonic() - started, received
            if not data:
                return time.monotonic() - started, received
            received += data        # e.g. a 408 answer; keep going until the close
        if time.monotonic() - started > give_up:
            break
    return None, received


def client_hello(pki):
    """The bytes of a real TLS ClientHello, made without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(pki, "alice").wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_silent_tcp_client_is_dropped(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()], **FAST)
    sock = socket.create_connection(("127.0.0.1", edd.port), timeout=10)
    started = time.monotonic()
    assert closed_by_server(sock, timeout=10)
    assert time.monotonic() - started < 2.0
    sock.close()


def test_handshake_trickled_byte_by_byte_is_dropped_by_its_deadline(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()], **FAST)
    hello = client_hello(edd.factory.pki)
    sock = socket.create_connection(("127.0.0.1", edd.port), timeout=10)
    # Each byte comes well within the 1 s per-read timeout; only a deadline ends this.
    elapsed, _ = trickle(sock, hello)
    sock.close()
    assert elapsed is not None, "edd kept a trickling handshake open for 8 s"
    assert elapsed < 2.5, elapsed


def test_head_trickled_byte_by_byte_is_dropped_by_its_deadline(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()], **FAST)
    others = []

    def another_client():
        time.sleep(0.5)
        started = time.monotonic()
        reply = https_request(edd, "GET", "/v1/deployments", timeout=5)
        others.append((reply.status, time.monotonic() - started))

    sock = tls_connect(edd)
    meanwhile = threading.Thread(target=another_client)
    try:
        sock.sendall(b"GET /v1/deployments HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        meanwhile.start()
        elapsed, received = trickle(sock, b"X-Slow: " + b"a" * 100)
    finally:
        sock.close()
        meanwhile.join(10)
    assert elapsed is not None, "edd kept a trickling request head open for 8 s"
    assert elapsed < 2.5, elapsed
    assert received == b"" or received.startswith(b"HTTP/1.1 408"), received
    # The other client was answered at once while this one trickled.
    assert others and others[0][0] == 200 and others[0][1] < 1.0, others


@pytest.mark.docker
def test_request_cut_off_by_the_head_deadline_never_runs(edd_factory, make_image):
    # The request line is complete, the head is not: when the deadline drops the
    # client, edd must not go on to act on the half-received request.
    edd, deployment = start_deployed(edd_factory, make_image, **FAST)
    before = host_state(deployment.name)
    sock = tls_connect(edd)
    sock.sendall(b"POST /v1/deployments/%s/stop HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 % deployment.name.encode())
    elapsed, received = trickle(sock, b"X-Slow: " + b"a" * 100)
    sock.close()
    assert elapsed is not None and elapsed < 2.5, elapsed
    assert not received.startswith(b"HTTP/1.1 2"), received
    time.sleep(1.5)     # a stop, if one was started, has had time to show
    assert_untouched(edd, deployment, before)
    assert not [a for a in audit_lines(edd) if a.get("action") == "stop"], edd.log()


@pytest.mark.docker
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_stalled_mid_body_is_aborted(edd_factory, make_image, never, chunked):
    edd, deployment = start_deployed(edd_factory, make_image, **FAST)
    before = host_state(deployment.name)
    archive = never.read_bytes()
    half = len(archive) // 2
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: %d" % len(archive)
    sock = tls_connect(edd)
    try:
        sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name, framing))
        sock.sendall((b"%x\r\n" % len(archive) if chunked else b"") + archive[:half])
        wait_for(lambda: docker_load_running(edd), timeout=5, message="docker load to start")
        # While this upload stalls, another client is answered at once.
        started = time.monotonic()
        reply = https_request(edd, "GET", "/v1/deployments/%s" % deployment.name, timeout=5)
        assert reply.status == 200 and reply.json["state"] == "running", reply
        assert time.monotonic() - started < 1.0
        # After body_timeout_seconds edd gives up: docker load is killed, the
        # connection closes (a 4xx answer first is fine too).
        wait_for(lambda: not docker_load_running(edd), timeout=5,
                 message="docker load to be killed")
        sock.settimeout(5)
        try:
            rest = sock.recv(65536)
        except (OSError, ssl.SSLError):
            rest = b""
        assert rest == b"" or re.match(rb"HTTP/1\.1 4\d\d ", rest), rest
    finally:
        sock.close()
    assert_untouched(edd, deployment, before)
    assert not image_exists(NEVER)
    audit = wait_audit(edd, lambda fields: fields["status"] != "200", client="alice",
                       deployment=deployment.name, action="load")
    # (How many bytes it counts is test_audit_counts_the_bytes_of_a_stalled_upload's.)
    assert int(audit.get("bytes", "0")) <= half, audit


# ---------------------------------------------------------------------------
# Paths are matched exactly
# ---------------------------------------------------------------------------

def path_variants(target, other):
    """(method, path) pairs that a lenient server might map onto an action on `target`."""
    return [
        ("POST", "/v1/deployments/{t}%2Fstop"), ("POST", "/v1/deployments/{t}%2fstop"),
        ("POST", "/v1/{t}%2Fstop"), ("POST", "/v1/deployments%2F{t}/stop"),
        ("POST", "/v1/deployments/{t}/%73top"), ("POST", "/v1/deployments/%74{t_tail}/stop"),
        ("POST", "/v1/deployments/%2e%2e/deployments/{t}/stop"),
        ("POST", "/v1/deployments/{o}/%2e%2e/{t}/stop"),
        ("POST", "/v1/deployments/{o}/%2E%2E/{t}/stop"),
        ("POST", "/v1/deployments/{o}%2F..%2F{t}/stop"),
        ("POST", "/v1/deployments/{o}/../{t}/stop"), ("POST", "/v1/deployments/../{t}/stop"),
        ("POST", "/v1/deployments/{t}/stop/.."), ("POST", "/v1/deployments/{t}/./stop"),
        ("POST", "/v1/{o}/../{t}/stop"), ("POST", "/v1/./{t}/stop"),
        ("POST", "/v1/deployments/{t}/stop/x"), ("POST", "/v1/deployments/{t}/stop/"),
        ("POST", "/v1/deployments/{t}/stopx"), ("POST", "/v1/deployments/{t}/stop;x"),
        ("POST", "/v1/deployments/{t}/stop%00"), ("POST", "/v1/deployments/{t}%00/stop"),
        ("POST", "/v1/deployments/{t}//stop"), ("POST", "/v1/deployments//{t}/stop"),
        ("POST", "/v1/deployments/{t}\\stop"), ("POST", "/v1/deployments/{T}/stop"),
        ("POST", "/v1/deployments/{t}/STOP"), ("POST", "/V1/deployments/{t}/stop"),
        ("POST", "/v1/deployments/{t}%20/stop"), ("POST", "/v1/deployments/{t}/stop%20"),
        ("POST", "/v1/deployments/{t}/stop#x"), ("POST", "/v1/deployments/{t}/restart/"),
        ("POST", "/v1/{t}/restart/x"), ("POST", "/v1/deployments/{t}/rollback%2F"),
        ("DELETE", "/v1/deployments/{t}/"), ("DELETE", "/v1/deployments/{t}%2F"),
        ("DELETE", "/v1/deployments/{t}/x"), ("DELETE", "/v1/deployments/{t}/.."),
        ("DELETE", "/v1/deployments/{o}/../{t}"), ("DELETE", "/v1/deployments/{t}%00"),
        ("POST", "/v1/deployments/{t}%2Fload"), ("POST", "/v1/deployments/{t}/load/x"),
        ("POST", "/v1/deployments/{t}/load/"),
    ], dict(t=target, o=other, T=target.upper(), t_tail=target[1:])


# NUL bytes: http.client refuses to send them, so these go out by hand.
RAW_PATHS = [(b"POST", b"/v1/deployments/{t}\x00/stop"), (b"POST", b"/v1/deployments/{t}/stop\x00"),
             (b"POST", b"/v1/deployments/{t}/stop\x00/../x"), (b"POST", b"/v1/{t}/stop\x00"),
             (b"POST", b"/v1/{t}\x00/stop"), (b"DELETE", b"/v1/deployments/{t}\x00")]


@pytest.mark.docker
def test_paths_are_matched_exactly(edd_factory, make_image):
    other = edd_factory.deployment()
    edd, deployment = start_deployed(edd_factory, make_image, others=[other])
    assert deployment.name[0] == "t"      # unique_name("t"): %74 is "t"
    before = host_state(deployment.name)
    audited = len(audit_lines(edd))
    variants, names = path_variants(deployment.name, other.name)
    for method, template in variants:
        path = template.format(**names)
        reply = https_request(edd, method, path)
        assert reply.status in (400, 404), (method, path, reply)
        assert_json_error(reply, reply.status)
    for method, template in RAW_PATHS:
        path = template.replace(b"{t}", deployment.name.encode())
        reply = exchange(edd, method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 0\r\n\r\n")
        assert reply.status in (400, 404), (path, reply)
    assert_untouched(edd, deployment, before)
    assert host_state(other.name) == ({other.name: None, other.name + ".edd-old": None}, [])
    assert audit_lines(edd)[audited:] == [], "an action ran for a path that is not exact"


# ---------------------------------------------------------------------------
# Framing: bad chunking, bad or conflicting lengths, smuggled requests
# ---------------------------------------------------------------------------

TE = "Transfer-Encoding: chunked"
FRAMING = [
    ("bad-chunk-size", [TE], b"zz\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-size-0x", [TE], b"0x5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-size-negative", [TE], b"-5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-size-17-digits", [TE], b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-size-empty", [TE], b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-line-too-long", [TE], b"5;" + b"x" * 4000 + b"\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-data-too-long", [TE], b"3\r\nhello\r\n0\r\n\r\n", (400,)),
    ("chunk-bare-lf", [TE], b"5\nhello\n0\n\n", (400,)),
    ("chunk-size-huge", [TE], b"ffffffffffffffff\r\nhello\r\n", (400, 413)),
    ("both-framings", ["Content-Length: 24", TE], b"5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("te-then-cl", [TE, "Content-Length: 24"], b"5\r\nhello\r\n0\r\n\r\n", (400,)),
    ("te-gzip", ["Transfer-Encoding: gzip"], b"hello", (400, 501)),
    ("te-gzip-chunked", ["Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n", (400, 501)),
    ("te-chunked-twice", [TE, TE], b"0\r\n\r\n", (400,)),
    ("te-identity", ["Transfer-Encoding: identity"], b"hello", (400, 501)),
    ("neither", [], b"", (411,)),
    ("cl-conflicting", ["Content-Length: 5", "Content-Length: 6"], b"hello!", (400,)),
    ("cl-conflicting-list", ["Content-Length: 5, 6"], b"hello!", (400,)),
    ("cl-not-a-number", ["Content-Length: 5x"], b"hello", (400,)),
    ("cl-negative", ["Content-Length: -1"], b"hello", (400,)),
    ("cl-hex", ["Content-Length: 0x5"], b"hello", (400,)),
    ("cl-plus", ["Content-Length: +5"], b"hello", (400,)),
    ("cl-empty", ["Content-Length: "], b"hello", (400, 411)),
    ("cl-huge", ["Content-Length: 99999999999999999999999"], b"hello", (400, 413)),
]


@pytest.mark.docker
def test_malformed_framing_is_a_clean_4xx(edd_factory, make_image):
    edd, deployment = start_deployed(edd_factory, make_image)
    before = host_state(deployment.name)
    failures = []
    for label, lines, body, statuses in FRAMING:
        sock = tls_connect(edd)
        try:
            sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name, *lines)
                         + body)
            sock.settimeout(10)
            reply = read_response(sock)
            if reply.status not in statuses or not (reply.json or {}).get("error"):
                failures.append((label, reply.status, reply.body))
            elif body and not closed_by_server(sock):
                # The unread body must never be parsed as a next request.
                failures.append((label, "connection kept open after a framing error"))
        except Exception as exc:
            failures.append((label, repr(exc)))
        finally:
            sock.close()
        wait_for(lambda: not docker_load_running(edd), timeout=10, message="docker load to end")
    assert not failures, failures
    assert_untouched(edd, deployment, before)
    succeeded = [a for a in audit_lines(edd) if a["status"].startswith("2")]
    assert len(succeeded) == 1, succeeded       # only start_deployed's push


def smuggled_stop(name):
    return (b"POST /v1/deployments/%s/stop HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 0\r\n\r\n" % name.encode())


@pytest.mark.docker
def test_bodies_never_become_requests(edd_factory, make_image):
    """A body edd does not read must not be parsed as the next request on the connection."""
    restricted = edd_factory.deployment(clients=["dns:bob.example"])
    edd, deployment = start_deployed(edd_factory, make_image, others=[restricted])
    before = host_state(deployment.name)
    stop = smuggled_stop(deployment.name)
    name = deployment.name
    chunked_stop = b"%x\r\n%s\r\n0\r\n\r\n" % (len(stop), stop)
    cases = [
        # A GET with a body: answered, then the body must be skipped or the connection closed.
        head("GET", "/v1/deployments/%s" % name, "Content-Length: %d" % len(stop)) + stop,
        head("GET", "/v1/deployments/%s" % name, TE) + chunked_stop,
        # Refused uploads: 403, 404, 405, 400 before the body is read.
        head("POST", "/v1/deployments/%s/load" % restricted.name,
             "Content-Length: %d" % len(stop)) + stop,
        head("POST", "/v1/deployments/no-such-app/load", "Content-Length: %d" % len(stop)) + stop,
        head("GET", "/v1/deployments/%s/load" % name, "Content-Length: %d" % len(stop)) + stop,
        head("POST", "/v1/deployments/%s/load" % name, "Content-Length: ") + stop,
        head("POST", "/v1/deployments/%s/load" % name, "Transfer-Encoding: ") + stop,
        # Framing a front end might read differently from edd.
        head("POST", "/v1/deployments/%s/load" % name, "Content-Length: %d" % len(stop), TE)
        + b"0\r\n\r\n" + stop,
        head("POST", "/v1/deployments/%s/load" % name, TE) + b"zz\r\n" + stop,
        head("POST", "/v1/deployments/%s/load" % name,
             "Content-Length: 0", "Content-Length: %d" % len(stop)) + stop,
    ]
    def stops():
        return len([a for a in audit_lines(edd) if a.get("action") == "stop"])

    failures = []
    for data in cases:
        stopped = stops()
        received = read_until_closed(edd, data)
        statuses = re.findall(rb"^HTTP/1\.[01] (\d{3})", received, re.M)
        time.sleep(0.5)
        if len(statuses) > 1 or stops() > stopped or host_state(name) != before:
            failures.append((data.split(b"\r\n\r\n")[0], statuses))
            # Put the deployment back for the next case.
            assert curl(edd, "POST", "/v1/deployments/%s/start" % name).status == 200
            assert fetch(deployment.port) == V1_TEXT
            before = host_state(name)
    assert not failures, "bodies parsed as requests after:\n" + "\n".join(map(repr, failures))
    assert_untouched(edd, deployment, before)


def read_until_closed(edd, data, quiet=3):
    """Send `data` on a fresh connection; return all edd sends until it closes
    (or is quiet for `quiet` s)."""
    sock = tls_connect(edd)
    received = b""
    try:
        sock.sendall(data)
        sock.settimeout(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except (OSError, ssl.SSLError):
                break
            if not piece:
                break
            received += piece
            sock.settimeout(quiet)
    finally:
        sock.close()
    return received


@pytest.mark.docker
@pytest.mark.parametrize("unterminated", [
    b"POST /v1/deployments/{t}/stop HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    b"POST /v1/deployments/{t}/stop HTTP/1.1\r\n",
    b"POST /v1/deployments/{t}/stop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
], ids=["no-blank-line", "request-line-only", "header-cut"])
def test_unterminated_head_is_never_acted_on(edd_factory, make_image, unterminated):
    # The client stops sending (EOF) before the blank line that ends the head:
    # an incomplete request must not run.
    edd, deployment = start_deployed(edd_factory, make_image)
    before = host_state(deployment.name)
    sock = tls_connect(edd)
    sock.sendall(unterminated.replace(b"{t}", deployment.name.encode()))
    socket.socket.shutdown(sock, socket.SHUT_WR)
    sock.settimeout(10)
    try:
        answer = sock.recv(65536)
    except (OSError, ssl.SSLError):
        answer = b""
    sock.close()
    assert not answer.startswith(b"HTTP/1.1 2"), answer
    time.sleep(1.5)
    assert_untouched(edd, deployment, before)
    assert not [a for a in audit_lines(edd) if a.get("action") == "stop"], edd.log()


@pytest.mark.parametrize("request_line", [
    b"GET /v1/deployments HTTP/2.0", b"GET /v1/deployments HTTP/1.x", b"GET /v1/deployments FOO",
    b"GET /v1/deployments HTTP/1.1.1", b"GET /v1/deployments HTTP/0.9",
], ids=["http2", "bad-minor", "no-http", "three-part", "http09-with-version"])
def test_malformed_request_line_gets_a_status_line(edd_factory, request_line):
    # Whatever is wrong with the request line, the answer is a real HTTP/1.x
    # response with a 4xx/505 status and a JSON error, not a bare body.
    edd = edd_factory.start([edd_factory.deployment()])
    sock = tls_connect(edd)
    sock.sendall(request_line + b"\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(10)
    received = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", received)
    assert match, "no status line in the answer: %r" % received[:200]
    assert match.group(1)[:1] == b"4" or match.group(1) == b"505", received[:200]


# ---------------------------------------------------------------------------
# Certificates and TLS versions
# ---------------------------------------------------------------------------

def attempt(edd, context, path="/v1/deployments"):
    """('answer', bytes) or ('refused', exception) for one GET with this client context."""
    try:
        with socket.create_connection(("127.0.0.1", edd.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                             % path).encode())
                answer = b""
                while True:
                    piece = tls.recv(65536)
                    if not piece:
                        break
                    answer += piece
    except (ssl.SSLError, OSError) as exc:
        return "refused", exc
    return ("answer" if answer.startswith(b"HTTP/") else "refused"), answer


def test_tls_below_1_2_is_refused(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()])
    context = client_context(edd.factory.pki, "alice")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        # Let the client offer TLS 1.1 if this OpenSSL can, so that it is edd that refuses.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    outcome, detail = attempt(edd, context)
    assert outcome == "refused", detail
    # Positive controls: TLS 1.2 and 1.3 work.
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(edd.factory.pki, "alice")
        context.minimum_version = context.maximum_version = version
        outcome, detail = attempt(edd, context)
        assert outcome == "answer" and b" 200 " in detail.split(b"\r\n")[0], (version, detail)


@pytest.mark.docker
@pytest.mark.parametrize("cert", [None, "mallory", "expired", "future", "server-usage"],
                         ids=["no-cert", "wrong-ca", "expired", "not-yet-valid",
                              "server-eku-only"])
def test_refused_certificates_deploy_nothing(edd_factory, make_image, never, cert):
    pki = edd_factory.pki
    if cert == "server-usage":
        try:
            pki.client(cert)
        except KeyError:
            pki.make_client(cert, eku="serverAuth")
    edd, deployment = start_deployed(edd_factory, make_image)
    before = host_state(deployment.name)
    for pinned in (None, ssl.TLSVersion.TLSv1_2):
        context = client_context(pki, cert)
        if pinned:
            context.maximum_version = pinned
        outcome, detail = attempt(edd, context, "/v1/deployments/%s?probe=1" % deployment.name)
        assert outcome == "refused", (pinned, detail)
    reply = push(edd, deployment, never, cert=cert)
    assert reply.status == 0 and reply.returncode != 0, reply
    reply = curl(edd, "POST", "/v1/deployments/%s/stop" % deployment.name, cert=cert)
    assert reply.status == 0 and reply.returncode != 0, reply
    assert_untouched(edd, deployment, before)
    assert not image_exists(NEVER)
    assert "probe=1" not in edd.log()
    assert "/stop" not in edd.log()


# ---------------------------------------------------------------------------
# Audit trail
# ---------------------------------------------------------------------------

AUDIT_KEYS = {"id", "time", "client", "deployment", "action", "status", "duration_ms"}


def check_audit_line(fields):
    assert AUDIT_KEYS <= set(fields), fields
    stamp = datetime.datetime.fromisoformat(fields["time"])
    assert stamp.tzinfo is not None, fields
    assert abs(time.time() - stamp.timestamp()) < 600, fields
    assert re.match(r"\d{3}\Z", fields["status"]), fields
    assert re.match(r"\d+\Z", fields["duration_ms"]), fields
    if "bytes" in fields:
        assert re.match(r"\d+\Z", fields["bytes"]), fields


@pytest.mark.docker
def test_audit_lines_for_a_deploy_and_refusals(edd_factory, make_image, v1, tmp_path):
    edd, deployment = start_deployed(edd_factory, make_image, {"clients": ["dns:bob.example"]},
                                     cert="bob")
    name = deployment.name
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not an image archive\n" * 500)
    assert_json_error(push(edd, deployment, v1, cert="alice"), 404)
    assert_json_error(push(edd, deployment, garbage, cert="bob", chunked=False), 400)

    deployed = wait_audit(edd, client="bob", deployment=name, action="load", status=200)
    for fields in audit_lines(edd):
        check_audit_line(fields)
    expected_id = make_image.image_id(v1)
    assert deployed["image_id"] == expected_id, deployed
    assert deployed["running"] == expected_id, deployed
    assert int(deployed["bytes"]) == v1.stat().st_size, deployed

    refused = wait_audit(edd, client="alice", deployment=name, action="load", status=404)
    assert refused.get("bytes", "0") == "0" and "image_id" not in refused, refused
    failed = wait_audit(edd, client="bob", deployment=name, action="load", status=400)
    assert int(failed["bytes"]) == garbage.stat().st_size, failed
    assert "image_id" not in failed, failed
    # Each audit line has its request line with the same id.
    for fields in (deployed, refused, failed):
        assert re.search(r"request id=%s client=%s " % (fields["id"], fields["client"]),
                         edd.log()), fields


@pytest.mark.docker
def test_audit_counts_the_bytes_of_a_stalled_upload(edd_factory):
    # "bytes received" is what arrived, also when the upload then stalls.
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment], **FAST)
    sent = 300 << 10
    sock = tls_connect(edd)
    sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name,
                      "Content-Length: %d" % (1 << 20)) + b"\0" * sent)
    fields = wait_audit(edd, deployment=deployment.name, action="load")
    sock.close()
    check_audit_line(fields)
    assert fields["bytes"] == str(sent), fields


@pytest.mark.docker
def test_audit_line_stays_parseable_with_a_hostile_common_name(edd_factory):
    # A CN with spaces, quotes and key=value text must not forge audit fields
    # (test_security_round2 has the newline kind).
    pki = edd_factory.pki
    hostile = 'eve status=200 client=alice "x'
    try:
        pki.client("eve")
    except KeyError:
        pki.make_client("eve", cn=hostile)
    deployment = edd_factory.deployment(clients=["dns:bob.example"])
    edd = edd_factory.start([deployment])
    reply = https_request(edd, "POST", "/v1/deployments/%s/stop" % deployment.name, cert="eve")
    assert_json_error(reply, 404)
    fields = wait_audit(edd, deployment=deployment.name, action="stop")
    check_audit_line(fields)
    assert fields["client"] == hostile and fields["status"] == "404", fields


# ---------------------------------------------------------------------------
# Fuzz: live server over TLS, and the chunked decoder in-process
# ---------------------------------------------------------------------------

FUZZ_CASES = 320
FUZZ_SEED = 20261128
EXTRA_METHODS = ["GET", "POST", "PUT", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "get",
                "PRI", "G\tET", "X" * 300, "", "POST\x00", "\xffGET"]


def random_bytes(rng, count):
    return bytes(rng.getrandbits(8) for _ in range(count))


def chunk_encode(rng, payload, extensions=True):
    out, position = b"", 0
    while position < len(payload):
        size = rng.randint(1, max(1, len(payload) - position))
        piece = payload[position:position + size]
        ext = b";name=value" if extensions and rng.random() < 0.2 else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        position += size
    trailer = b"X-Trailer: 1\r\n" if rng.random() < 0.2 else b""
    return out + b"0\r\n" + trailer + b"\r\n"


def mutate(rng, data, rounds=None):
    """Random byte-level and line-level damage to `data`."""
    data = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.randint(1, 4)):
        kind = rng.randrange(11)
        where = rng.randint(0, len(data))
        if kind == 0 and data:                                   # flip a byte
            data[min(where, len(data) - 1)] = rng.getrandbits(8)
        elif kind == 1:                                          # insert random bytes
            data[where:where] = random_bytes(rng, rng.randint(1, 16))
        elif kind == 2 and data:                                 # delete a range
            del data[where:where + rng.randint(1, 32)]
        elif kind == 3:                                          # duplicate a range
            data[where:where] = data[where:where + rng.randint(1, 64)]
        elif kind == 4:                                          # CRLF -> LF or CR
            data = bytearray(bytes(data).replace(b"\r\n", rng.choice([b"\n", b"\r"]), 1))
        elif kind == 5:                                          # a huge line
            data[where:where] = b"Y" * rng.choice([1025, 8193, 70000])
        elif kind == 6:                                          # a NUL or a high byte
            data[where:where] = rng.choice([b"\x00", b"\xff", b"\x85", b"\xa0"])
        elif kind == 7:                                          # truncate
            del data[where:]
        elif kind == 8:                                          # inject a framing header
            line = rng.choice([b"Content-Length: 3", b"Content-Length: -1",
                               b"Content-Length: 99999999999999", b"Transfer-Encoding: chunked",
                               b"Transfer-Encoding: gzip", b"Expect: 100-continue",
                               b"Connection: keep-alive", b" folded", b"\tfolded",
                               b"NoColon", b": empty-name", b"Content-Length : 5"])
            end = bytes(data).find(b"\r\n")
            at = end + 2 if end >= 0 else len(data)
            data[at:at] = line + b"\r\n"
        elif kind == 9:                                          # many headers
            end = bytes(data).find(b"\r\n")
            at = end + 2 if end >= 0 else len(data)
            data[at:at] = b"".join(b"H%d: v\r\n" % n for n in range(rng.choice([50, 101, 300])))
        else:                                                    # random chunk-size line
            data[where:where] = rng.choice([b"\r\nzz\r\n", b"\r\n-1\r\n", b"\r\n0\r\n\r\n",
                                            b"\r\nffffffffffffffff\r\n", b"\r\n5;" + b"e" * 2000])
    return bytes(data)


def fuzz_request(rng, live, open_one, closed):
    """One random request (bytes). `live` is deployed and is only read, or loaded
    with bodies that cannot be images; `open_one` is never deployed; `closed` is bob's."""
    upload = rng.random() < 0.45
    if upload:                     # an upload, with every kind of framing
        method = rng.choice(["POST", "PUT", "POST", "PUT", "GET", "DELETE", "PATCH"])
        path = rng.choice(["/v1/deployments/%s/load" % live, "/v1/%s/load?image=x" % live,
                           "/v1/deployments/%s/load" % open_one, "/v1/%s/load" % closed,
                           "/v1/deployments/no-such-app/load"])
    else:
        resources = [
            "/v1/deployments", "/v1/health", "/metrics", "/v1/deployments/%s" % live,
            "/v1/deployments/%s/logs?tail=5" % live, "/v1/%s/logs?tail=-1" % live,
            "/v1/deployments/%s/logs?tail=1&tail=2" % live, "/v1/deployments/%s" % open_one,
            "/v1/deployments/%s" % closed, "/v1/%s/stop" % closed,
            "/v1/deployments/no-such-app", "*", "/", "//v1/deployments",
            "/v1/deployments/%2e%2e", "/%00", "http://127.0.0.1/v1/deployments",
            "/v1/deployments/" + "a" * 5000, "/v1/deployments/%s%%2Fstop" % live,
            "/v1/deployments/\u00e9t\u00e9", "/v1/deployments?x=%ff%00"]
        resources += ["/v1/deployments/%s/%s" % (name, verb) for name in (open_one, closed)
                      for verb in ("start", "stop", "restart", "rollback", "logs")]
        path = rng.choice(resources)
        method = rng.choice(["GET", "POST", "PUT", "DELETE"] * 4 + EXTRA_METHODS)
        if method == "DELETE" and live in path:
            method = "GET"
    version = rng.choice(["HTTP/1.1"] * 24 + ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1x",
                                              "http/1.1", "HTTP/11"])
    lines = ["Host: 127.0.0.1", "Connection: close"]
    payload = random_bytes(rng, rng.choice([0, 1, 100, 5000, 70000]))
    framing = rng.randrange(5)
    if framing == 0:
        lines.append("Content-Length: %d" % len(payload))
        body = payload
    elif framing == 1:
        lines.append("Transfer-Encoding: chunked")
        body = chunk_encode(rng, payload)
    elif framing == 2:
        body = b""
    else:
        lines.append("Transfer-Encoding: chunked")
        body = mutate(rng, chunk_encode(rng, payload))
    for _ in range(rng.randint(0, 3)):
        lines.append(rng.choice(["X-Fuzz: %d" % rng.getrandbits(32), "Accept: */*",
                                 "Expect: 100-continue", "Connection: keep-alive",
                                 "User-Agent: " + "u" * rng.choice([10, 9000]),
                                 "Cookie: a=b", "X-Empty:", "Content-Length: 0"]))
    rng.shuffle(lines)
    request_line = ("%s %s %s" % (method, path, version)).encode("utf-8")
    header_block = "\r\n".join(lines).encode("utf-8")
    damage = rng.random() * (2 if upload else 1)    # uploads: mostly reach the body
    if damage < 0.1:
        request_line = mutate(rng, request_line, rounds=1)
    elif damage < 0.45:
        header_block = mutate(rng, header_block)
    data = request_line + b"\r\n" + header_block + b"\r\n\r\n" + body
    if rng.random() < 0.1:
        data = mutate(rng, data, rounds=1)      # anywhere, e.g. the blank line
    if rng.random() < 0.1:                      # a second, pipelined request
        data += b"GET /v1/deployments/%s HTTP/1.1\r\nHost: x\r\n\r\n" % live.encode()
    # Nothing in the fuzz may legitimately change the live deployment.
    live_bytes = re.escape(live.encode())
    if re.search(rb"DELETE\s+\S*" + live_bytes, data) or \
            re.search(live_bytes + rb"/(start|stop|restart|rollback)\b", data):
        return fuzz_request(rng, live, open_one, closed)
    return data


def fuzz_one(edd, context, data):
    """Send `data`, then read until edd closes. Return a problem (str) or None.

    edd runs with 1 s header and body timeouts, so it must answer or close
    within a few seconds whatever it was sent."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", edd.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                try:
                    tls.sendall(data)
                except OSError:
                    pass      # edd answered and closed before taking all of it
                deadline = time.monotonic() + 5
                while True:
                    if time.monotonic() > deadline:
                        return "neither answered nor closed within 5 s"
                    try:
                        piece = tls.recv(65536)
                    except socket.timeout:
                        return "neither answered nor closed within 5 s"
                    except (OSError, ssl.SSLError):
                        break                       # reset: a closed connection
                    if not piece:
                        break
                    received += piece
    except (OSError, ssl.SSLError) as exc:
        if not received:
            return "connect/handshake failed: %r" % exc
    if b"Traceback" in received:
        return "traceback in the answer"
    if not received:
        return None                                  # closed: fine
    if not received.startswith(b"HTTP/1."):
        # http.server answers a request line without a version as HTTP/0.9 (a bare
        # body), and its errors about a bad version likewise (that is a bug, see
        # test_malformed_request_line_gets_a_status_line). Here: a two-word request
        # line may get any bare body; any other bare answer must be a JSON error.
        if len(data.split(b"\n", 1)[0].split()) == 2:
            return None
        try:
            json.loads(received.decode("utf-8"))
        except ValueError:
            return "answer is neither HTTP/1.x nor JSON: %r" % received[:120]
        return None
    for status in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", received, re.M):
        status = int(status)
        # 501 (a method http.server does not know) and 505 (HTTP/2+) are protocol
        # refusals, not failures; any other 5xx means something broke inside edd.
        if status >= 500 and status not in (501, 505):
            return "status %d: %r" % (status, received[:300])
    return None


@pytest.mark.docker
def test_fuzz_live_server(edd_factory, make_image):
    open_one = edd_factory.deployment()
    closed = edd_factory.deployment(clients=["dns:bob.example"])
    edd, live = start_deployed(edd_factory, make_image, others=[open_one, closed],
                               header_timeout_seconds=1, body_timeout_seconds=1,
                               handshake_timeout_seconds=2)
    before = host_state(live.name)
    rng = random.Random(FUZZ_SEED)
    cases = [fuzz_request(rng, live.name, open_one.name, closed.name)
             for _ in range(FUZZ_CASES)]
    context = client_context(edd.factory.pki, "alice")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        problems = [(data[:160], problem) for data, problem in
                    zip(cases, pool.map(lambda data: fuzz_one(edd, context, data), cases))
                    if problem]
    took = time.monotonic() - started
    assert not problems, "%d of %d cases:\n%s" % (
        len(problems), len(cases), "\n".join("%r -> %s" % p for p in problems[:15]))
    assert took < 30, took
    # edd is up, the live deployment is untouched, nothing was deployed elsewhere.
    assert edd.proc.poll() is None
    assert https_request(edd, "GET", "/v1/deployments", timeout=5).status == 200
    assert_untouched(edd, live, before)
    assert host_state(open_one.name) == ({open_one.name: None,
                                          open_one.name + ".edd-old": None}, [])
    assert host_state(closed.name)[1] == []
    assert "Traceback" not in edd.log()
    assert "unexpected error" not in edd.log()


def test_fuzz_chunked_body_in_process():
    rng = random.Random(FUZZ_SEED)
    allowed = (eddpy.BadRequest, eddpy.ClientGone, eddpy.PayloadTooLarge)
    decoded_intact = 0
    for case in range(3000):
        payload = random_bytes(rng, rng.choice([0, 1, 7, 100, 3000]))
        encoded = chunk_encode(rng, payload)
        intact = case % 4 == 0
        data = encoded if intact else mutate(rng, encoded)
        limit = rng.choice([1 << 30, len(payload), len(payload) + 1, max(len(payload) - 1, 0)])
        rfile = io.BufferedReader(io.BytesIO(data + b"NEXT"))
        body = eddpy.ChunkedBody(rfile, limit)
        try:
            out = read_all(body, rng.choice([1, 3, 64, 4096]))
        except allowed:
            assert not (intact and len(payload) <= limit), (case, data[:200])
            continue
        # Anything else escaping fails the test with its traceback.
        assert len(out) <= limit and body.received == len(out), case
        assert body.readinto(memoryview(bytearray(8))) == 0     # stays at the end
        if intact:
            assert out == payload, case
            assert rfile.read() == b"NEXT", "read past the end of the chunked body"
            decoded_intact += 1
    assert decoded_intact > 100


def test_fuzz_framing_headers_in_process():
    rng = random.Random(FUZZ_SEED + 1)
    allowed = (eddpy.BadRequest, eddpy.LengthRequired, eddpy.PayloadTooLarge)
    values = ["0", "5", "05", " 5 ", "5, 5", "5,6", "-1", "+1", "0x5", "1e3", "", " ",
              "99999999999999999999999", "\u0665", "chunked", "Chunked", "gzip", "chunked, gzip",
              "identity", "chunked,", ",chunked", "\x00"]
    for _ in range(2000):
        headers = email.message.Message()
        for _ in range(rng.randint(0, 3)):
            headers[rng.choice(["Content-Length", "Transfer-Encoding"])] = rng.choice(values)
        limit = rng.choice([0, 4, 5, 1 << 30])
        try:
            length = eddpy.body_length(headers, limit)
        except allowed:
            continue
        assert length is None or (isinstance(length, int) and 0 <= length <= limit), length
        if length is None:
            assert headers.get_all("Content-Length") is None, headers.items()


def test_fuzz_routes_match_exactly_in_process():
    rng = random.Random(FUZZ_SEED + 2)
    canonical = ["/v1/deployments", "/v1/health", "/metrics", "/v1/deployments/web",
                 "/v1/deployments/web/load", "/v1/deployments/web/stop", "/v1/web/start",
                 "/v1/deployments/web/logs", "/v1/web/rollback", "/v1/deployments/web/restart"]
    accepted = set()
    for _ in range(5000):
        path = rng.choice(canonical)
        if rng.random() < 0.9:
            path = mutate(rng, path.encode(), rounds=rng.randint(1, 2)).decode("latin-1")
        method = rng.choice(["GET", "POST", "PUT", "DELETE"])
        try:
            function, params, action = eddpy.match_route(method, path)
        except (eddpy.NotFound, eddpy.MethodNotAllowed):
            continue
        accepted.add(path)
        name = params.get("name")
        # A path that matches is exactly one a route spells, around a name that
        # holds no slash, percent sign or NUL.
        if name is not None:
            rebuilt = {"/v1/deployments/%s" % name, "/v1/%s/%s" % (name, action),
                       "/v1/deployments/%s/%s" % (name, action),
                       "/v1/deployments/%s/logs" % name, "/v1/%s/logs" % name}
            assert path in rebuilt, (path, params, action)
            assert "/" not in name and "%" not in name and "\x00" not in name, path
        else:
            assert path in canonical, path
    assert len(accepted) > 5
