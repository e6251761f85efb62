"""Issue 11, end to end: each attack of the second security review, replayed.

One section per item of the issue: typed identities, a bounded server, logs
bounded by bytes, revocation and expiry, unforgeable log lines, a minimum
upload rate, what a client may not use it does not see, parser and TLS
strictness, `make client-cert`. Every test runs a real edd over real TLS.
"""

import datetime
import http.client
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import edd as eddpy  # noqa: E402  (the module under test, in-process)
from conftest import (REPO, client_context, curl, docker_load_running, fetch, free_port,
                      https_request, read_response, run_tag, tls_connect, wait_for)
from test_security import (V1, V1_TEXT, assert_json_error, audit_lines, closed_by_server,
                           head, push, start_deployed, wait_audit)

V2, V2_TEXT = run_tag("edd-round2-site", "v2"), "edd round two v2\n"


def certificate(pki, name, **kwargs):
    """pki.make_client once per session: (crt, key) of client `name`."""
    try:
        return pki.client(name)
    except KeyError:
        return pki.make_client(name, **kwargs)


def serial_of(crt):
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(crt)],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    return out.strip().split("=", 1)[1]


def process_status(pid, key):
    """A field of /proc/PID/status as an int (kB for memory, a count for Threads)."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (key, pid))


def keep_alive(edd, cert="alice"):
    """An http.client connection that has made one request (so it is open and idle)."""
    conn = http.client.HTTPSConnection("127.0.0.1", edd.port, timeout=10,
                                       context=client_context(edd.factory.pki, cert))
    conn.request("GET", "/v1/deployments")
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read()
    return conn


# ---------------------------------------------------------------------------
# 1. Typed identities
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_sans_and_second_cns_do_not_pass_for_a_cn(edd_factory, make_image):
    pki = edd_factory.pki
    certificate(pki, "mallory-dns", cn="mallory", san="DNS:alice")
    certificate(pki, "mallory-email", cn="mallory", san="email:alice")
    certificate(pki, "carol-alice", cn="carol/CN=alice")
    deployment = edd_factory.deployment(clients=["alice"])
    edd = edd_factory.start([deployment], admins=["alice"])
    path = "/v1/deployments/%s" % deployment.name
    for cert in ("mallory-dns", "mallory-email"):
        assert_json_error(https_request(edd, "GET", path, cert=cert), 404)
        assert_json_error(https_request(edd, "POST", path + "/stop", cert=cert), 404)
        assert https_request(edd, "GET", "/v1/deployments", cert=cert).json == \
            {"deployments": []}
    # Two CNs: refused outright, whatever is asked.
    reply = https_request(edd, "GET", "/v1/deployments", cert="carol-alice")
    assert_json_error(reply, 403)
    assert "subject CNs" in reply.json["error"], reply.json
    assert_json_error(https_request(edd, "POST", path + "/stop", cert="carol-alice"), 403)

    # The real alice may; her audit line names the identity that let her in and
    # the certificate's serial, so `grep identity=alice` finds what she did.
    reply = push(edd, deployment, make_image(V1, content=V1_TEXT))
    assert reply.status == 200, reply
    assert fetch(deployment.port) == V1_TEXT
    fields = wait_audit(edd, client="alice", deployment=deployment.name, action="load",
                        status=200)
    assert fields["identity"] == "alice", fields
    assert fields["serial"] == serial_of(pki.client("alice")[0]), fields
    refused = wait_audit(edd, client="mallory", deployment=deployment.name, action="stop")
    assert refused["status"] == "404" and refused["refused"] == "not-allowed", refused
    assert "identity" not in refused, refused


@pytest.mark.docker
@pytest.mark.parametrize("clients, allowed", [
    (["dns:alice"], "mallory-dns"), (["email:alice"], "mallory-email")])
def test_typed_entries_match_only_their_kind(edd_factory, clients, allowed):
    pki = edd_factory.pki
    certificate(pki, "mallory-dns", cn="mallory", san="DNS:alice")
    certificate(pki, "mallory-email", cn="mallory", san="email:alice")
    deployment = edd_factory.deployment(clients=clients)
    edd = edd_factory.start([deployment])
    path = "/v1/deployments/%s" % deployment.name
    assert https_request(edd, "GET", path, cert=allowed).status == 200
    for other in {"alice", "mallory-dns", "mallory-email"} - {allowed}:
        assert_json_error(https_request(edd, "GET", path, cert=other), 404)


def test_config_explains_identity_forms(tmp_path, pki):
    config = {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key),
              "client_ca": str(pki.ca), "listen": "127.0.0.1:%d" % free_port(),
              "deployments": [{"name": "web", "clients": ["DNS:web.example"]}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(REPO / "edd.py"), "--check", "--config", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 1
    assert "deployments[0].clients" in proc.stderr and "dns:NAME" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------
# 2. A bounded server
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_300_idle_connections_cost_no_threads_and_lock_no_one_out(edd_factory, make_image):
    edd, deployment = start_deployed(edd_factory, make_image)
    kept = keep_alive(edd)                          # a client already being served
    baseline = process_status(edd.proc.pid, "Threads")
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", edd.port), timeout=10))
        time.sleep(1)
        threads = process_status(edd.proc.pid, "Threads")
        # The old server: a thread and a timer thread for each, 600 more.
        assert threads <= baseline + 5, (baseline, threads)
        # Real clients still get in, with curl, for a read and for a push.
        reply = curl(edd, "GET", "/v1/deployments/%s" % deployment.name)
        assert reply.status == 200, reply
        reply = push(edd, deployment, make_image(V2, content=V2_TEXT))
        assert reply.status == 200, reply
        assert fetch(deployment.port) == V2_TEXT
        kept.request("GET", "/v1/deployments")
        assert kept.getresponse().status == 200
        assert process_status(edd.proc.pid, "Threads") <= baseline + 5
    finally:
        for sock in idle:
            sock.close()
        kept.close()


def test_connections_past_max_connections_wait_their_turn(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()], max_connections=1)
    first = keep_alive(edd)                  # holds the only worker while it stays open
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(
        https_request(edd, "GET", "/v1/deployments", timeout=20).status))
    waiting.start()
    time.sleep(1.5)
    assert answers == [], "a second connection was served past max_connections=1"
    first.close()
    waiting.join(20)
    assert answers == [200]


# ---------------------------------------------------------------------------
# 3. Logs bounded by bytes
# ---------------------------------------------------------------------------

# 4000 lines of 16 KiB (64 MiB): docker's json-file keeps each as one entry, so
# tail=10000 asks for all of it.
FLOOD_CMD = ["/bin/busybox", "sh", "-c",
             "line=$(/bin/busybox head -c 16000 /dev/zero | /bin/busybox tr '\\0' x); "
             "i=0; while [ $i -lt 4000 ]; do echo $line; i=$((i+1)); done; echo flood done; "
             "trap 'exit 0' TERM; /bin/busybox httpd -f -p 8000 -h /www & wait"]


@pytest.mark.docker
def test_logs_stream_and_stop_at_max_log_bytes(edd_factory, make_image):
    flood = make_image(run_tag("edd-round2-flood"), content="flood\n", cmd=FLOOD_CMD)
    deployment = edd_factory.deployment(settle_seconds=1)
    edd = edd_factory.start([deployment])
    assert push(edd, deployment, flood).status == 200
    path = "/v1/deployments/%s/logs" % deployment.name
    wait_for(lambda: "flood done" in https_request(edd, "GET", path + "?tail=2").body,
             timeout=120, interval=1, message="the container's 64 MiB of output")

    replies, peak = [], [0]
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.05):
            peak[0] = max(peak[0], process_status(edd.proc.pid, "VmRSS"))
    sampler = threading.Thread(target=sample)
    sampler.start()
    readers = [threading.Thread(target=lambda: replies.append(
        https_request(edd, "GET", path + "?tail=10000", timeout=120))) for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(150)
    sampling.set()
    sampler.join()
    peak[0] = max(peak[0], process_status(edd.proc.pid, "VmHWM"))
    assert len(replies) == 4
    assert peak[0] < 60 << 10, "edd's RSS reached %d KiB" % peak[0]
    for reply in replies:
        assert reply.status == 200 and reply.headers["x-edd-max-log-bytes"] == "1048576", reply
        assert reply.headers.get("transfer-encoding") == "chunked", reply.headers
        size = len(reply.body.encode())
        assert 1048576 <= size < 1048576 + 200, size
        assert reply.body.endswith("[edd: output cut at max_log_bytes=1048576; "
                                   "ask for a smaller tail]\n"), reply.body[-200:]
    # docker logs was stopped once the limit was reached.
    wait_for(lambda: not [c for c in children_of(edd) if " logs " in c], timeout=10,
             message="docker logs to be stopped")
    # A tail that fits comes whole, without the note.
    reply = https_request(edd, "GET", path + "?tail=1")
    assert reply.body.replace("\r", "") == "flood done\n", reply.body[-200:]


def children_of(edd):
    from conftest import children
    return children(edd.proc.pid)


# ---------------------------------------------------------------------------
# 4. Revocation and expiry
# ---------------------------------------------------------------------------

def reload_and_wait(edd, config, text="reloaded"):
    since = len(edd.log())
    edd.reload(config)
    wait_for(lambda: text in edd.log()[since:], message=text)


def test_replacing_client_ca_ends_open_connections(edd_factory):
    pki = edd_factory.pki
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])
    kept = keep_alive(edd)
    raw = tls_connect(edd)          # handshaken, no request yet
    reload_and_wait(edd, dict(edd.config, client_ca=str(pki.other_ca)), "closing connections")
    # Both connections made under the old client_ca are closed by edd...
    assert closed_by_server(raw)
    raw.close()
    with pytest.raises((http.client.HTTPException, OSError)):
        kept.request("POST", "/v1/deployments/%s/restart" % deployment.name)
        kept.getresponse()
    kept.close()
    # ... a new one with the revoked CA's certificate fails, the new CA's works.
    with pytest.raises((ssl.SSLError, OSError)):
        https_request(edd, "GET", "/v1/deployments", cert="alice").status
    assert https_request(edd, "GET", "/v1/deployments", cert="mallory").status == 200
    assert not [a for a in audit_lines(edd) if a.get("action") == "restart"]


@pytest.mark.docker
def test_request_under_way_when_client_ca_changes_is_answered_then_closed(edd_factory,
                                                                         make_image):
    deployment = edd_factory.deployment(settle_seconds=3)
    edd = edd_factory.start([deployment])
    conn = keep_alive(edd)
    archive = make_image(V2, content=V2_TEXT).read_bytes()
    replies = []

    def push_on_kept():
        conn.request("POST", "/v1/deployments/%s/load" % deployment.name, body=archive,
                     headers={"Content-Type": "application/x-tar"})
        reply = conn.getresponse()
        replies.append((reply.status, reply.getheader("Connection"), reply.read()))
    pushing = threading.Thread(target=push_on_kept)
    pushing.start()
    wait_for(lambda: "deployment=%s loaded" % deployment.name in edd.log(), timeout=30,
             message="the swap's gate to be running")
    reload_and_wait(edd, dict(edd.config, client_ca=str(edd.factory.pki.other_ca)),
                    "closing connections")
    pushing.join(30)
    assert replies and replies[0][:2] == (200, "close"), replies
    assert fetch(deployment.port) == V2_TEXT
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/v1/deployments")
        conn.getresponse()
    conn.close()


def test_reload_without_tls_changes_keeps_connections(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()])
    kept = keep_alive(edd)
    reload_and_wait(edd, dict(edd.config, admins=["alice"]))
    kept.request("GET", "/v1/deployments")
    assert kept.getresponse().status == 200
    kept.close()


def utc(offset):
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y%m%d%H%M%SZ")


def test_certificate_expiring_on_an_open_connection_stops_working(edd_factory):
    pki = edd_factory.pki
    pki.make_client("short-lived", startdate=utc(-60), enddate=utc(6))
    edd = edd_factory.start([edd_factory.deployment()])
    kept = keep_alive(edd, "short-lived")
    context = client_context(pki, "short-lived")
    context.maximum_version = ssl.TLSVersion.TLSv1_2     # session ids, not tickets
    with socket.create_connection(("127.0.0.1", edd.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as first:
            session = first.session
    ends = expiry(pki)
    time.sleep(max(ends - time.time(), 0))
    kept.request("GET", "/v1/deployments")
    reply = kept.getresponse()
    body = json.loads(reply.read())
    assert reply.status == 403 and "not valid now" in body["error"], body
    assert reply.getheader("Connection") == "close"
    kept.close()
    # Resuming the session made while it was valid does not get around the check.
    for resume in (session, None):
        with pytest.raises((ssl.SSLError, OSError, AssertionError)):
            with socket.create_connection(("127.0.0.1", edd.port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                         session=resume) as tls:
                    tls.sendall(head("GET", "/v1/deployments"))
                    assert read_response(tls).status == 200


def expiry(pki):
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in",
                          str(pki.client("short-lived")[0])], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]) + 1


def test_sessions_are_not_resumed(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()])
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = client_context(edd.factory.pki, "alice")
        context.minimum_version = context.maximum_version = version
        session = None
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", edd.port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                         session=session) as tls:
                    tls.sendall(head("GET", "/v1/deployments", "Connection: close"))
                    assert read_response(tls).status == 200
                    assert not tls.session_reused, version
                    session = tls.session


# ---------------------------------------------------------------------------
# 5. Log lines that cannot be forged
# ---------------------------------------------------------------------------

FORGED_CN = "e\naudit id=1 client=alice action=load status=200\n<2>crit"   # <= 64


@pytest.mark.docker
def test_newline_in_a_common_name_forges_no_log_line(edd_factory):
    pki = edd_factory.pki
    certificate(pki, "eve-newline", cn=FORGED_CN)
    deployment = edd_factory.deployment(clients=["alice"])
    open_one = edd_factory.deployment()
    edd = edd_factory.start([deployment, open_one])
    reply = https_request(edd, "POST", "/v1/deployments/%s/stop" % deployment.name,
                          cert="eve-newline")
    assert reply.status in (403, 404), reply            # (which one is item 7's test)
    assert https_request(edd, "GET", "/v1/deployments", cert="eve-newline").status == 200
    # An upload the client abandons: the "gone" line.
    sock = tls_connect(edd, "eve-newline")
    sock.sendall(head("POST", "/v1/deployments/%s/load" % open_one.name,
                      "Content-Length: 1000") + b"\0" * 10)
    time.sleep(0.5)
    sock.close()
    # Two audit lines (the stop, the abandoned load), both with the CN intact.
    wait_for(lambda: len(audit_lines(edd)) >= 2 and "gone" in edd.log(),
             message="two audit lines and the gone line")
    assert [a["client"] for a in audit_lines(edd)] == [FORGED_CN] * 2
    for line in edd.log().splitlines():
        assert not line.startswith(("<", "audit", "request")), line
        assert "\x1b" not in line
    # The error line of a malformed request names the client too.
    sock = tls_connect(edd, "eve-newline")
    sock.sendall(head("GET", "/v1/deployments", "Bad Header: x"))
    assert read_response(sock).status == 400
    sock.close()
    wait_for(lambda: "malformed header" in edd.log(), message="the error line")
    for line in edd.log().splitlines():
        assert not line.startswith(("<", "audit", "request")), line


# ---------------------------------------------------------------------------
# 6. An upload has a minimum rate
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_trickled_upload_is_aborted_and_the_lock_released(edd_factory, make_image):
    edd, deployment = start_deployed(edd_factory, make_image, upload_min_bytes_per_second=2000,
                                     body_timeout_seconds=2)
    sock = tls_connect(edd)
    sock.sendall(head("POST", "/v1/deployments/%s/load" % deployment.name,
                      "Content-Length: 1000000"))
    started, answer = time.monotonic(), b""
    sock.settimeout(0.5)
    # 100 bytes every 0.5 s: each read comes well within body_timeout_seconds.
    while time.monotonic() - started < 15:
        try:
            sock.sendall(b"\0" * 100)
            answer += sock.recv(65536)
            if answer:
                break
        except socket.timeout:
            continue
        except (OSError, ssl.SSLError):
            break
    elapsed = time.monotonic() - started
    sock.settimeout(5)
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), (elapsed, answer)
    assert b"upload_min_bytes_per_second" in answer, answer
    assert elapsed < 5, elapsed
    wait_for(lambda: not docker_load_running(edd), timeout=5, message="docker load to end")
    # The deployment is free again: the next push deploys.
    reply = push(edd, deployment, make_image(V2, content=V2_TEXT))
    assert reply.status == 200, reply
    assert fetch(deployment.port) == V2_TEXT


# ---------------------------------------------------------------------------
# 7. What a client may not use, it does not see
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_restricted_deployment_is_invisible(edd_factory, make_image):
    edd, secret = start_deployed(edd_factory, make_image, {"clients": ["dns:bob.example"]},
                                 cert="bob")
    hidden = https_request(edd, "GET", "/v1/deployments/%s" % secret.name)
    unknown = https_request(edd, "GET", "/v1/deployments/%s" % (secret.name + "x"))
    assert hidden.status == unknown.status == 404
    assert hidden.json["error"].replace(secret.name, "N") == \
        unknown.json["error"].replace(secret.name + "x", "N")
    assert set(hidden.headers) == set(unknown.headers)
    mine = https_request(edd, "GET", "/metrics", cert="bob").body
    theirs = https_request(edd, "GET", "/metrics", cert="alice").body
    assert 'deployment="%s"' % secret.name in mine
    assert secret.name not in theirs
    assert "edd_requests_total" in theirs
    # metrics_clients see everything, and still may use nothing.
    edd.reload(dict(edd.config, metrics_clients=["alice"]))
    wait_for(lambda: secret.name in https_request(edd, "GET", "/metrics").body,
             message="alice to see every series after the reload")
    assert https_request(edd, "GET", "/v1/deployments/%s" % secret.name).status == 404


# ---------------------------------------------------------------------------
# 8. Parser and TLS strictness
# ---------------------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.parametrize("line", ["X-A : 1", " folded", "NoColon", ": empty-name",
                                  "Bad Name: 1"])
def test_malformed_header_line_is_400_and_closed(edd_factory, make_image, line):
    edd, deployment = start_deployed(edd_factory, make_image)
    sock = tls_connect(edd)
    stop = b"POST /v1/deployments/%s/stop HTTP/1.1\r\nHost: x\r\n\r\n" % deployment.name.encode()
    sock.sendall(head("GET", "/v1/deployments", line, "Content-Length: %d" % len(stop)) + stop)
    reply = read_response(sock)
    assert_json_error(reply, 400)
    assert "header" in reply.json["error"]
    assert closed_by_server(sock)
    sock.close()
    assert fetch(deployment.port) == V1_TEXT
    assert not [a for a in audit_lines(edd) if a.get("action") == "stop"]


def test_failed_handshakes_are_not_logged_one_by_one(edd_factory):
    edd = edd_factory.start([edd_factory.deployment()])
    context = ssl.create_default_context(cafile=str(edd.factory.pki.ca))   # no cert
    for _ in range(30):
        try:
            with socket.create_connection(("127.0.0.1", edd.port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.recv(1)
        except (ssl.SSLError, OSError):
            pass
    assert https_request(edd, "GET", "/v1/deployments").status == 200
    assert "handshake" not in edd.log(), edd.log()


def test_failed_handshakes_are_counted_once_a_minute(pki, tmp_path, monkeypatch, caplog):
    # In-process, with the minute shortened to a second.
    monkeypatch.setattr(eddpy, "HANDSHAKE_SUMMARY_SECONDS", 1)
    caplog.set_level(logging.DEBUG, logger="edd")
    config = eddpy.parse_config({
        "listen": "127.0.0.1:%d" % free_port(), "server_cert": str(pki.server_cert),
        "server_key": str(pki.server_key), "client_ca": str(pki.ca), "deployments": []},
        str(tmp_path / "config.json"))
    server = eddpy.Server(eddpy.App(config))
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))        # no certificate
        for _ in range(5):
            try:
                with socket.create_connection(config.listen, timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.recv(1)
            except (ssl.SSLError, OSError):
                pass
        def counted():
            return sum(int(re.search(r"(\d+) handshakes failed", r.getMessage()).group(1))
                       for r in caplog.records
                       if r.levelno == logging.INFO and "handshakes failed" in r.getMessage())
        wait_for(lambda: counted() == 5, timeout=5, message="summary lines counting 5")
        failures = [r for r in caplog.records if "tls handshake failed" in r.getMessage()]
        assert len(failures) == 5 and {r.levelno for r in failures} == {logging.DEBUG}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("cipher, accepted", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", True), ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
    ("ECDHE-ECDSA-AES128-SHA", False), ("ECDHE-ECDSA-AES256-SHA384", False),
    ("AES128-GCM-SHA256", False), ("AES256-SHA", False)])
def test_tls12_ciphers_are_ecdhe_with_aead(module_edd_factory, cipher, accepted):
    edd = module_edd_factory.instances[0] if module_edd_factory.instances else \
        module_edd_factory.start([module_edd_factory.deployment()])
    context = client_context(edd.factory.pki, "alice")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    try:
        with socket.create_connection(("127.0.0.1", edd.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(head("GET", "/v1/health", "Connection: close"))
                answered = read_response(tls).status > 0
    except (ssl.SSLError, OSError):
        answered = False
    assert answered == accepted


# ---------------------------------------------------------------------------
# 9. make client-cert
# ---------------------------------------------------------------------------

def make_client_cert(pki, tmp_path, *args):
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "client-cert",
                           "CA_CERT=%s" % pki.ca, "CA_KEY=%s" % pki.ca_key,
                           "OUT=%s" % tmp_path] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


@pytest.mark.parametrize("args, identity", [
    (["NAME=ci-runner"], "ci-runner"),
    (["NAME=ci-web", "DNS=ci.example"], "dns:ci.example"),
    (["NAME=dana", "EMAIL=dana@example.com"], "email:dana@example.com")],
    ids=["cn", "dns", "email"])
def test_make_client_cert(edd_factory, tmp_path, args, identity):
    pki = edd_factory.pki
    out = make_client_cert(pki, tmp_path, *args)
    name = args[0].split("=", 1)[1]
    crt, key = tmp_path / (name + ".crt"), tmp_path / (name + ".key")
    assert out.strip().splitlines()[-1] == "identity: %s" % identity, out
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(crt)],
                          stdout=subprocess.PIPE, universal_newlines=True).stdout
    assert "TLS Web Client Authentication" in text and "CA:FALSE" in text, text
    days = (ssl.cert_time_to_seconds(re.search(r"Not After : (.*)", text).group(1).strip())
            - time.time()) / 86400
    assert 89 < days <= 90, days
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    pki._clients["made-" + name] = (crt, key)
    deployment = edd_factory.deployment(clients=[identity])
    edd = edd_factory.start([deployment])
    path = "/v1/deployments/%s" % deployment.name
    assert curl(edd, "GET", path, cert="made-" + name).status == 200
    assert curl(edd, "GET", path, cert="alice").status == 404
    # The same key and name under another identity is refused.
    other = edd_factory.deployment(clients=["someone-else"])
    edd = edd_factory.start([other])
    assert curl(edd, "GET", "/v1/deployments/%s" % other.name,
                cert="made-" + name).status == 404


def test_make_client_cert_needs_a_name(tmp_path, pki):
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "client-cert",
                           "CA_CERT=%s" % pki.ca, "CA_KEY=%s" % pki.ca_key,
                           "OUT=%s" % tmp_path], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode != 0 and "NAME=" in proc.stdout, proc.stdout
    assert list(Path(str(tmp_path)).iterdir()) == []
