"""The pure parts: body framing and decoding, docker load output, routing, identities."""
import email.message
import io

import logging

import pytest

import edd
from conftest import read_all


def headers(**values):
    message = email.message.Message()
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            message[key.replace("_", "-")] = item
    return message


# -- framing --------------------------------------------------------------

def test_body_length():
    assert edd.body_length(headers(Content_Length="12"), 100) == 12
    assert edd.body_length(headers(Content_Length=["5", "5"]), 100) == 5
    assert edd.body_length(headers(Transfer_Encoding="Chunked"), 100) is None


@pytest.mark.parametrize("given, error", [
    ({}, edd.LengthRequired),
    ({"Content_Length": "101"}, edd.PayloadTooLarge),
    ({"Content_Length": "-1"}, edd.BadRequest),
    ({"Content_Length": "1e3"}, edd.BadRequest),
    ({"Content_Length": "\u0661"}, edd.BadRequest),          # an Arabic-Indic digit one
    ({"Content_Length": ["5", "6"]}, edd.BadRequest),
    ({"Content_Length": "5", "Transfer_Encoding": "chunked"}, edd.BadRequest),
    ({"Transfer_Encoding": "gzip, chunked"}, edd.BadRequest),
])
def test_bad_framing(given, error):
    with pytest.raises(error):
        edd.body_length(headers(**given), 100)


# -- chunked decoding -----------------------------------------------------

def chunked_body(raw, limit=1000):
    return edd.ChunkedBody(io.BufferedReader(io.BytesIO(raw)), limit)


def test_chunked_decodes_across_chunks_extensions_and_trailers():
    raw = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: y\r\n\r\nNEXT"
    body = chunked_body(raw)
    assert read_all(body) == b"hello 0123456789"
    assert body.received == 16
    assert body.rfile.read() == b"NEXT"      # stops exactly at the end of the body


def test_chunked_fills_the_whole_buffer_across_chunks():
    body = chunked_body(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    view = memoryview(bytearray(10))
    assert body.readinto(view) == 6 and bytes(view[:6]) == b"abcdef"
    assert body.readinto(view) == 0


@pytest.mark.parametrize("raw, error", [
    (b"zz\r\nhello\r\n0\r\n\r\n", edd.BadRequest),             # size not hex
    (b"-5\r\nhello\r\n0\r\n\r\n", edd.BadRequest),
    (b"5\r\nhelloXX0\r\n\r\n", edd.BadRequest),                 # data longer than its size
    (b"5\nhello\r\n0\r\n\r\n", edd.BadRequest),                 # no CR
    (b"1" * 2000 + b"\r\n", edd.BadRequest),                    # absurd line
    (b"11111111111111111\r\n", edd.BadRequest),                 # 17 hex digits
    (b"5\r\nhello\r\n", edd.ClientGone),                        # no last chunk
    (b"5\r\nhel", edd.ClientGone),                              # cut inside a chunk
    (b"", edd.ClientGone),
    (b"400\r\n", edd.PayloadTooLarge),                          # over the limit of 1000
])
def test_chunked_errors(raw, error):
    with pytest.raises(error):
        read_all(chunked_body(raw))


def test_length_body_reads_exactly_and_notices_a_short_body():
    rfile = io.BufferedReader(io.BytesIO(b"0123456789rest"))
    body = edd.LengthBody(rfile, 10)
    assert read_all(body, size=4) == b"0123456789" and body.received == 10
    with pytest.raises(edd.ClientGone, match="after 3 of 10 bytes"):
        read_all(edd.LengthBody(io.BufferedReader(io.BytesIO(b"abc")), 10))


# -- docker load output ---------------------------------------------------

def test_parse_load_output():
    text = ("Loaded image: website:latest\n"
            "Loaded image: website:v2\n"
            "Loaded image ID: sha256:abc\n"
            "Loaded image: website:latest\n"
            "some progress line\n")
    assert edd.parse_load_output(text) == ["website:latest", "website:v2", "sha256:abc"]
    assert edd.parse_load_output("") == []


# -- routing and identities -----------------------------------------------

@pytest.mark.parametrize("method, path, function, params", [
    ("GET", "/v1/deployments", "list_deployments", {}),
    ("GET", "/v1/deployments/web", "get_deployment", {"name": "web"}),
    ("POST", "/v1/deployments/web/load", "load", {"name": "web"}),
    ("PUT", "/v1/web/load", "load", {"name": "web"}),
    ("POST", "/v1/web/rollback", "act", {"name": "web"}),
    ("GET", "/v1/deployments/web/logs", "deployment_logs", {"name": "web"}),
    ("GET", "/metrics", "metrics", {}),
])
def test_routes(method, path, function, params):
    found, found_params, _ = edd.match_route(method, path)
    assert found.__name__ == function and found_params == params


@pytest.mark.parametrize("path", [
    "/v1/deployments/web/load/", "/v1/deployments/web/load/x", "/v1/deployments/web%2Fload",
    "/v1/deployments/../web/load", "/v1/x/y/z/load", "/v2/deployments", "/", "",
    "/v1/deployments/web/unknown",
])
def test_paths_match_exactly(path):
    with pytest.raises(edd.NotFound):
        edd.match_route("POST" if path.endswith("load") else "GET", path)


def test_wrong_method_lists_allowed():
    with pytest.raises(edd.MethodNotAllowed) as caught:
        edd.match_route("GET", "/v1/deployments/web/load")
    assert caught.value.allowed == ["POST", "PUT"]
    assert edd.error_response(caught.value).headers == (("Allow", "POST, PUT"),)


def test_identities_and_authorization(tmp_path):
    cert = {"subject": ((("organizationName", "x"),), (("commonName", "bob"),)),
            "subjectAltName": (("DNS", "bob.example"), ("email", "bob@example.com"),
                               ("IP Address", "10.0.0.1")),
            "serialNumber": "0A1B", "notBefore": "Jan  1 00:00:00 2020 GMT",
            "notAfter": "Jan  1 00:00:00 2040 GMT"}
    client = edd.Client.from_cert(cert)
    assert client.name == "bob" and client.serial == "0A1B"
    assert client.identities == {"bob", "dns:bob.example", "email:bob@example.com"}
    client.check()
    config = edd.Config(path="x", deployments={}, admins=frozenset(["root"]))
    assert edd.may_use(config, client, edd.Deployment("web"))
    assert edd.granting_identity(config, client, edd.Deployment("web")) == "*"
    web = edd.Deployment("web", clients=frozenset(["dns:bob.example"]))
    assert edd.granting_identity(config, client, web) == "dns:bob.example"
    # A SAN never passes for a CN, nor one kind of SAN for another.
    assert not edd.may_use(config, client, edd.Deployment("web", clients=frozenset(
        ["bob.example", "bob@example.com", "email:bob.example", "dns:bob"])))
    admin = edd.Client("root", frozenset(["root"]))
    assert edd.granting_identity(config, admin, edd.Deployment(
        "web", clients=frozenset(["alice"]))) == "root"


def test_certificate_with_several_cns_is_refused():
    cert = {"subject": ((("commonName", "carol"),), (("commonName", "alice"),))}
    client = edd.Client.from_cert(cert)
    assert "carol" not in client.identities and "alice" not in client.identities
    with pytest.raises(edd.Forbidden, match="2 subject CNs"):
        client.check()


def test_certificate_outside_its_validity_is_refused_per_request():
    client = edd.Client.from_cert({"subject": ((("commonName", "a"),),),
                                   "notBefore": "Jan  1 00:00:00 2020 GMT",
                                   "notAfter": "Jan  1 00:00:00 2021 GMT"})
    with pytest.raises(edd.Forbidden, match="not valid now"):
        client.check()
    client.check(now=client.not_before + 1)


@pytest.mark.parametrize("identity", ["DNS:bob.example", "cn:bob", "dns:", "", " bob",
                                      "san:x"])
def test_identity_forms_are_explained(identity):
    with pytest.raises(edd.ConfigError, match="dns:NAME"):
        edd._check_value([identity], list, "identities", "deployments[0].clients")


def test_log_lines_cannot_be_forged():
    line = edd.format_fields(client="eve\naudit id=1 client=alice\n<2>crit")
    assert "\n" not in line and line.startswith('client="eve\\n')
    record = logging.LogRecord("edd", logging.INFO, __file__, 1, "x %s", ("a\n<2>b\x1b",),
                               None)
    edd.EscapeControls().filter(record)
    assert record.getMessage() == "x a\\x0a<2>b\\x1b"


def test_metrics_show_only_visible_deployments():
    metrics = edd.Metrics()
    metrics.count("edd_deploys_total", deployment="mine", outcome="deployed")
    metrics.count("edd_deploys_total", deployment="theirs", outcome="deployed")
    metrics.count("edd_requests_total", status="200")
    text = metrics.render(lambda name: name == "mine")
    assert 'deployment="mine"' in text and "theirs" not in text
    assert 'edd_requests_total{status="200"} 1' in text


def test_log_fields_are_parseable():
    line = edd.format_fields(client="alice", path="/v1/a b", bytes=3, skipped=None)
    assert line == 'client=alice path="/v1/a b" bytes=3'


def test_metrics_render():
    metrics = edd.Metrics()
    metrics.count("edd_deploys_total", deployment="web", outcome="deployed")
    metrics.count("edd_deploys_total", deployment="web", outcome="deployed")
    metrics.observe("edd_deploy_duration_seconds", 3.0, deployment="web")
    text = metrics.render()
    assert 'edd_deploys_total{deployment="web",outcome="deployed"} 2' in text
    assert 'edd_deploy_duration_seconds_bucket{deployment="web",le="2.5"} 0' in text
    assert 'edd_deploy_duration_seconds_bucket{deployment="web",le="5"} 1' in text
    assert 'edd_deploy_duration_seconds_bucket{deployment="web",le="+Inf"} 1' in text
    assert 'edd_deploy_duration_seconds_count{deployment="web"} 1' in text
    assert "# TYPE edd_deploy_duration_seconds histogram" in text
    assert 'edd_build_info{python="' in text
