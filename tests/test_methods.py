"""HTTP methods (issue 16): HEAD answers like GET without a body; any other method
edd has no route for gets 405 with Allow (known route) or 404 (unknown), in JSON,
never http.server's 501. None of these reach a docker command that changes anything.
"""

import http.client
import json

import pytest

import edd as eddpy
from conftest import curl, https_request, tls_connect


@pytest.fixture(scope="module")
def shared(module_edd_factory):
    """One edd with one deployment that is never deployed (its state stays put)."""
    deployment = module_edd_factory.deployment()
    return module_edd_factory.start([deployment]), deployment


def read_answer(stream, method):
    """(status, headers, body) of one response read from a socket's file."""
    status = int(stream.readline().split()[1])
    headers = http.client.parse_headers(stream)
    length = int(headers["Content-Length"])
    return status, headers, b"" if method == "HEAD" else stream.read(length)


def exchange(sock, requests):
    """Send each (method, path) in turn on one connection, reading each answer before
    the next request goes out; return the answers."""
    stream = sock.makefile("rb")
    answers = []
    for method, path in requests:
        sock.sendall(("%s %s HTTP/1.1\r\nHost: edd\r\n\r\n" % (method, path)).encode())
        answers.append(read_answer(stream, method))
    return answers


def test_head_with_curl_matches_get(shared):
    edd, deployment = shared
    path = "/v1/deployments/" + deployment.name
    get = curl(edd, "GET", path)
    head = curl(edd, "HEAD", path, extra=["-I"])
    assert get.status == 200 and get.json["state"] == "absent", get
    assert head.status == 200 and head.returncode == 0, head
    # With -I curl prints the headers where a body would go: nothing else may follow.
    assert head.body.startswith("HTTP/1.1 200") and head.body.endswith("\r\n\r\n"), head.body
    assert "{" not in head.body, head.body
    for key in ("content-type", "content-length", "server"):
        assert head.headers.get(key) == get.headers[key], (key, head.headers, get.headers)
    assert int(head.headers["content-length"]) == len(get.body.encode())


@pytest.mark.parametrize("path", ["/v1/deployments", "/v1/deployments/{name}", "/metrics"])
def test_head_sends_no_body_and_the_connection_goes_on(shared, path):
    # If HEAD wrote its body, those bytes would stand where the next status line
    # must be, and the GET's answer could not be parsed.
    edd, deployment = shared
    path = path.format(name=deployment.name)
    with tls_connect(edd) as sock:
        (head_status, head, _), (get_status, get, body), (again, _, _) = exchange(
            sock, [("HEAD", path), ("GET", path), ("HEAD", path)])
    assert (head_status, get_status, again) == (200, 200, 200)
    assert head["Content-Type"] == get["Content-Type"]
    assert int(get["Content-Length"]) == len(body)
    if path != "/metrics":       # the request counters grow between the two
        assert head["Content-Length"] == get["Content-Length"]
        assert json.loads(body.decode())


def test_head_of_an_unknown_deployment_is_404_without_a_body(shared):
    edd, _ = shared
    with tls_connect(edd) as sock:
        (status, headers, _), (after, _, body) = exchange(
            sock, [("HEAD", "/v1/deployments/no-such-app"), ("GET", "/v1/deployments")])
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) > 0
    assert after == 200 and "deployments" in json.loads(body.decode())


@pytest.mark.parametrize("method, path, expected", [
    ("HEAD", "/v1/deployments/{name}/load", "POST, PUT"),
    ("TRACE", "/v1/deployments/{name}", "DELETE, GET, HEAD"),
    ("FOO", "/v1/deployments", "GET, HEAD"),
    ("PATCH", "/v1/health", "GET, HEAD"),
    ("OPTIONS", "/v1/{name}/stop", "POST"),
    ("get", "/metrics", "GET, HEAD"),           # methods are case-sensitive
])
def test_other_methods_on_a_known_route_are_405_with_allow(shared, method, path, expected):
    edd, deployment = shared
    with tls_connect(edd) as sock:
        (status, headers, body), (after, _, _) = exchange(
            sock, [(method, path.format(name=deployment.name)), ("GET", "/v1/deployments")])
    assert status == 405, (status, body)
    assert headers["Allow"] == expected
    assert headers["Content-Type"] == "application/json"
    if method != "HEAD":
        assert "not allowed" in json.loads(body.decode())["error"]
    assert after == 200             # still the same connection


@pytest.mark.parametrize("method", ["FOO", "TRACE", "CONNECT", "PATCH"])
def test_unknown_method_on_an_unknown_route_is_404_json(shared, method):
    edd, _ = shared
    reply = https_request(edd, method, "/v2/nothing/here")
    assert reply.status == 404, reply
    assert reply.json and "no such route" in reply.json["error"], reply.body


def test_curl_with_an_unknown_method_gets_json(shared):
    edd, deployment = shared
    reply = curl(edd, "BREW", "/v1/deployments/" + deployment.name)
    assert reply.status == 405 and reply.headers["allow"] == "DELETE, GET, HEAD", reply
    assert "not allowed" in reply.json["error"], reply.body


def test_route_table_lets_head_run_get_routes():
    function, params, _ = eddpy.match_route("HEAD", "/v1/deployments/web")
    assert function is eddpy.get_deployment and params == {"name": "web"}
    with pytest.raises(eddpy.MethodNotAllowed) as caught:
        eddpy.match_route("HEAD", "/v1/deployments/web/stop")
    assert caught.value.allowed == ["POST"]
