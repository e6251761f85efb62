"""The HTTP and TLS layer of a real edd process: routes, refusals, framing, timing.

Most of these need no Docker engine (they never reach a docker command); the
ones that push a body into `docker load` are marked `docker`.
"""

import re
import socket
import ssl
import time

import pytest

from conftest import (client_context, curl, https_request, read_response, run_tag,
                      tls_connect, unreachable)


@pytest.fixture
def edd_one(edd_factory):
    """An edd with one deployment (never deployed), for this test alone."""
    deployment = edd_factory.deployment()
    return edd_factory.start([deployment]), deployment


@pytest.fixture(scope="module")
def shared(module_edd_factory):
    """One edd for the checks that change nothing (routing, refusals)."""
    deployment = module_edd_factory.deployment()
    return module_edd_factory.start([deployment]), deployment


def assert_json_error(reply, status):
    assert reply.status == status, reply
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    assert isinstance(reply.json, dict) and reply.json.get("error"), reply.body


def allowed(reply):
    return {m.strip() for m in reply.headers.get("allow", "").split(",") if m.strip()}


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------

def test_unknown_deployment_is_404(shared):
    edd, _ = shared
    assert_json_error(https_request(edd, "GET", "/v1/deployments/no-such-app"), 404)
    assert_json_error(https_request(edd, "POST", "/v1/deployments/no-such-app/stop"), 404)
    assert_json_error(https_request(edd, "DELETE", "/v1/deployments/no-such-app"), 404)
    assert_json_error(https_request(edd, "POST", "/v1/no-such-app/restart"), 404)
    assert_json_error(curl(edd, "POST", "/v1/no-such-app/load", upload=__file__), 404)


@pytest.mark.parametrize("size", [8, 65536])
def test_error_answer_survives_an_unread_body(shared, size):
    # http.client (like many clients) sends the body right behind the headers
    # without waiting for an answer. If edd answers 404 and closes while that
    # body sits unread in the socket, the kernel sends RST and the client loses
    # the answer: edd must half-close and drain a bounded amount (lingering close).
    edd, _ = shared
    reply = https_request(edd, "POST", "/v1/deployments/no-such-app/load", body=b"x" * size)
    assert_json_error(reply, 404)


@pytest.mark.parametrize("path", ["/", "/v2/deployments", "/v1", "/v1/deployments/{name}/bogus",
                                  "/v1/deployments/{name}/load/more", "/v1/{name}/bogus",
                                  "/metrics/x"])
def test_unknown_route_is_404(shared, path):
    edd, deployment = shared
    assert_json_error(https_request(edd, "GET", path.format(name=deployment.name)), 404)


@pytest.mark.parametrize("method, path, expected", [
    ("DELETE", "/v1/deployments", {"GET"}),
    ("POST", "/v1/deployments", {"GET"}),
    ("GET", "/v1/deployments/{name}/load", {"POST", "PUT"}),
    ("DELETE", "/v1/deployments/{name}/load", {"POST", "PUT"}),
    ("GET", "/v1/deployments/{name}/stop", {"POST"}),
    ("PUT", "/v1/deployments/{name}/rollback", {"POST"}),
    ("PUT", "/v1/deployments/{name}", {"GET", "DELETE"}),
    ("GET", "/v1/{name}/load", {"POST", "PUT"}),
    ("GET", "/v1/{name}/start", {"POST"}),
    ("POST", "/v1/health", {"GET"}),
])
def test_wrong_method_is_405_with_allow(shared, method, path, expected):
    edd, deployment = shared
    reply = https_request(edd, method, path.format(name=deployment.name))
    assert_json_error(reply, 405)
    assert expected <= allowed(reply), reply.headers


@pytest.mark.docker
def test_alias_routes_behave_like_canonical_ones(edd_one, tmp_path):
    edd, deployment = edd_one
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive" * 100)
    canonical = curl(edd, "POST", "/v1/deployments/%s/load" % deployment.name, upload=garbage)
    alias = curl(edd, "POST", "/v1/%s/load" % deployment.name, upload=garbage)
    assert 400 <= canonical.status < 500, canonical
    assert (alias.status, alias.json) == (canonical.status, canonical.json)
    # Nothing ever deployed: no previous image to roll back to.
    assert_json_error(curl(edd, "POST", "/v1/%s/rollback" % deployment.name), 409)
    assert unreachable(deployment.port)


def test_request_log_line(shared):
    edd, _ = shared
    https_request(edd, "GET", "/v1/deployments/log-probe")
    pattern = (r"request id=[0-9a-f]+ client=alice method=GET "
               r"path=/v1/deployments/log-probe status=404 duration_ms=\d+")
    deadline = time.monotonic() + 5
    while not re.search(pattern, edd.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(pattern, edd.log()), edd.log()


@pytest.mark.docker
def test_health(shared, docker):
    edd, _ = shared
    reply = https_request(edd, "GET", "/v1/health")
    assert reply.status == 200, reply
    assert reply.json["status"] == "ok"
    assert reply.json["docker"].split("+")[0] == docker.split("+")[0]


# ---------------------------------------------------------------------------
# Refused client certificates: the handshake fails and nothing happens
# ---------------------------------------------------------------------------

REFUSED = [None, "mallory", "expired", "future"]


def raw_request_refused(edd, cert, path, tls12=False):
    """True when a GET with this client cert gets no HTTP answer at all."""
    context = client_context(edd.factory.pki, cert)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection(("127.0.0.1", edd.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                # With TLS 1.3 the client finishes its side of the handshake
                # before the server checks the certificate: the refusal arrives
                # as an alert on the first read.
                tls.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             "Connection: close\r\n\r\n" % path).encode())
                answer = tls.recv(4096)
    except (ssl.SSLError, OSError):
        return True
    return not answer.startswith(b"HTTP/")


@pytest.mark.parametrize("cert", REFUSED, ids=["none", "other-ca", "expired", "not-yet-valid"])
def test_refused_client_certificates(shared, cert):
    edd, deployment = shared
    path = "/v1/deployments/%s/stop?probe=%s" % (deployment.name, cert)
    assert raw_request_refused(edd, cert, path)
    assert raw_request_refused(edd, cert, path, tls12=True)
    reply = curl(edd, "POST", path, cert=cert)
    assert reply.status == 0 and reply.returncode != 0, reply
    # Nothing happened: no request was handled.
    assert "probe=%s" % cert not in edd.log()
    # And edd still serves good clients.
    assert https_request(edd, "GET", "/v1/deployments/no-such-app").status == 404


@pytest.mark.docker
@pytest.mark.parametrize("cert", REFUSED, ids=["none", "other-ca", "expired", "not-yet-valid"])
def test_refused_push_deploys_nothing(edd_one, make_image, cert):
    edd, deployment = edd_one
    archive = make_image(run_tag("edd-test-site", "v1"), content="edd test site v1\n")
    reply = curl(edd, "POST", "/v1/%s/load" % deployment.name, upload=archive, cert=cert)
    assert reply.status == 0 and reply.returncode != 0, reply
    assert https_request(edd, "GET", "/v1/deployments/%s" % deployment.name).json["state"] \
        == "absent"
    assert unreachable(deployment.port)


# ---------------------------------------------------------------------------
# Expect: 100-continue and slow or silent clients
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_expect_100_continue_is_answered_at_once(edd_one):
    edd, deployment = edd_one
    body = b"x" * 4096
    sock = tls_connect(edd)
    sock.sendall(("POST /v1/deployments/%s/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Content-Type: application/x-tar\r\nContent-Length: %d\r\n"
                  "Expect: 100-continue\r\n\r\n" % (deployment.name, len(body))).encode())
    sock.settimeout(0.9)
    started = time.monotonic()
    interim = b""
    while b"\r\n\r\n" not in interim:
        piece = sock.recv(1024)       # socket.timeout here means: no 100 Continue
        assert piece, interim
        interim += piece
    assert interim.startswith(b"HTTP/1.1 100"), interim
    assert time.monotonic() - started < 0.9
    head, _, rest = interim.partition(b"\r\n\r\n")
    assert not rest
    sock.settimeout(30)
    sock.sendall(body)
    final = read_response(sock)
    sock.close()
    assert 400 <= final.status < 500, final       # not an image: docker load fails


@pytest.mark.docker
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_curl_upload_does_not_stall_on_expect(edd_one, tmp_path, chunked):
    # curl waits up to 1 s for "100 Continue" before sending the body anyway
    # (its expect-100 timeout), so an edd that ignores Expect makes every push
    # take just over 1 s. A small upload finishing in < 0.9 s proves edd
    # answered the Expect itself.
    edd, deployment = edd_one
    small = tmp_path / "small.tar"
    small.write_bytes(b"not a tar archive\n" * 100)
    reply = curl(edd, "POST", "/v1/deployments/%s/load" % deployment.name, upload=small,
                 chunked=chunked, headers=["Expect: 100-continue"])
    assert 400 <= reply.status < 500, reply
    assert reply.elapsed < 0.9, reply.elapsed


def test_silent_clients_do_not_delay_others(edd_factory):
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment], handshake_timeout_seconds=2,
                            header_timeout_seconds=2)
    # Some connect and never start TLS; one finishes TLS and sends nothing.
    silent = [socket.create_connection(("127.0.0.1", edd.port), timeout=10) for _ in range(5)]
    quiet_tls = tls_connect(edd)
    try:
        started = time.monotonic()
        reply = https_request(edd, "GET", "/v1/deployments/no-such-app", timeout=5)
        assert reply.status == 404
        assert time.monotonic() - started < 1.0
        # The silent ones are dropped after their timeouts.
        for sock in silent:
            sock.settimeout(10)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        quiet_tls.settimeout(10)
        try:
            leftover = quiet_tls.recv(1024)
        except (ssl.SSLError, OSError):
            leftover = b""
        # Either a plain close or a 408 answer is fine; an open socket is not.
        assert leftover == b"" or leftover.startswith(b"HTTP/1.1 408"), leftover
    finally:
        for sock in silent + [quiet_tls]:
            sock.close()


@pytest.mark.docker
def test_sighup_reloads_deployments(edd_factory):
    first, second = edd_factory.deployment(), edd_factory.deployment()
    edd = edd_factory.start([first])
    assert_json_error(https_request(edd, "GET", "/v1/deployments/%s" % second.name), 404)
    edd.reload(dict(edd.config, deployments=[first, second]))
    deadline = time.monotonic() + 10
    while https_request(edd, "GET", "/v1/deployments/%s" % second.name).status != 200:
        assert time.monotonic() < deadline, edd.log()
        time.sleep(0.1)
    assert https_request(edd, "GET", "/v1/deployments/%s" % second.name).json["state"] \
        == "absent"
    assert edd.proc.poll() is None


def test_list_with_no_deployments_is_empty(edd_factory):
    # Nothing to look up: the answer must not depend on a docker call with no names.
    edd = edd_factory.start([])
    reply = https_request(edd, "GET", "/v1/deployments")
    assert reply.status == 200, reply
    items = reply.json if isinstance(reply.json, list) else reply.json["deployments"]
    assert items == []
