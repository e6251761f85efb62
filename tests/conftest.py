"""Shared fixtures for edd's tests: a test PKI, tiny busybox images, a running edd.

Fixture API (keep these names stable; other test files use them):

    pki                       session: PKI made with the openssl CLI
        .dir .ca .ca_key .other_ca .server_cert .server_key
        .client(name) -> (crt, key)   alice, bob, mallory, expired, future
        .make_client(name, cn=None, san=None, issuer="ca", startdate=None, enddate=None)
    docker                    session, one per engine (EDD_TEST_ENGINES, default
                              docker,podman): the engine's version (a str with .cli);
                              skip (fail with EDD_REQUIRE_DOCKER=1) without that engine.
                              Every test using it, make_image or the marker runs as
                              test_x[docker] and test_x[podman].
    @pytest.mark.docker       applies the `docker` fixture to a test
    @pytest.mark.engines("podman", reason="...")   only on these engines
    image_factory             session: the ImageFactory behind make_image, without the
                              engine check (archives are engine-neutral)
    make_image(tag, content=..., cmd=None, healthcheck=None, exits=False, gzip=False)
                              session-cached `docker save` archive (Path); the image is
                              removed from the engine after saving, so a push really loads it.
        .image_id(path)       the sha256:... id of the image in that archive
        .multi([(tag, content), ...], gzip=False)   one archive holding several images
    edd_factory               .start(deployments=[...], **toplevel) -> Edd
                              .deployment(name=None, port=None, args=(), **settings)
                              -> Deployment: a dict with .name and .port (container port
                              8000 published on 127.0.0.1:port); settle_seconds 0.5 unless
                              given (None leaves it out). Teardown stops every edd and
                              removes the deployments' containers and edd/<name> images.
    module_edd_factory        the same, shared by a module's tests
    Edd                       .port .url .proc .config .config_path .log() .stop() .kill()
                              .reload(new_config) .relaunch()
    curl(edd, method, path, *, cert="alice", upload=None, chunked=True, headers=(), extra=())
                              -> Response(status, headers, body, json) using the real curl
    https_request(edd, method, path, *, cert="alice", body=None, headers=None) -> Response
    tls_connect(edd, cert="alice") -> ssl.SSLSocket, for raw framing
    fetch(port, path="/", timeout=10) -> str    what the container serves (retries)
    unreachable(port) -> bool                   nothing answers HTTP on that port
    free_port(), unique_name(), run_tag(repo, version="v1") (a per-session image tag)
    docker_cli(*args, check=True, cli=None) -> CompletedProcess   (text, captured); the
                              running test's engine CLI (ENGINE["cli"]) unless cli= names one
    is_podman(cli=None), image_builder() (the CLI that builds make_image's archives)
    Edd.command, EddFactory.command   argv that runs edd.py (a test may run it as a user)
    container_state(name), container_labels(name), image_id(ref, cli=None), wait_for(predicate),
    read_response(sock), client_context(pki, cert)
    push(edd, deployment, archive, chunked=True, query="", cert="alice", method="POST")
                              -> Response of a curl upload to the deployment's /load
    assert_ok(reply) -> its JSON, or fail with status and body
    push_until_parked(edd, deployment, archive) -> (thread, replies) once NAME.edd-old exists
    rewrite_archive(source, target, tags=None, drop=(), replace=None, gzip=False) -> Path
                              (issue 9) a copy of an archive with other RepoTags, members
                              left out or replaced, gzip'd or not
    save_archive(path, *refs, gzip=False), commit_image(base, tag, content, cmd=None) -> id
                              (an image one layer above base), image_layers(ref),
                              archive_layer_members(archive)
    oci_archive(source, target, tags, compress=True) -> Path   (issue 9) the same image
                              in the OCI layout, layers gzip'd and named by that digest
    HTTPD_CMD, PROMPT_STOP_CMD (the default CMD), EXITS_CMD, HEALTHY_CHECK, FAILING_CHECK
    faulty_docker             (issue 10) a FaultyDocker: .path is a docker CLI to give edd
                              as `docker`; .set(rule, ...) arms faults (tests/faulty_docker.py
                              documents the rules); .calls(action=None) lists what ran.
    Every edd of a test shares state_dir <tmp_path>/state (swap records and locks)
                              unless the config given to start() names another.
    Prober(port, expected)    a thread that GETs / every 20 ms: .start() .stop() .answered
                              .failures (each refused, reset, slow or wrong answer)

Import the helpers with `from conftest import ...` (tests/ has no __init__.py).
"""

import collections
import fcntl
import gzip as gzip_module
import hashlib
import http.client
import io
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EDD = REPO / "edd.py"
BUSYBOX = Path(os.environ.get("EDD_TEST_BUSYBOX", "/usr/bin/busybox"))

# busybox httpd as PID 1 ignores SIGTERM (PID 1 gets no default signal
# handlers), so every `docker stop` would wait its full 10 s timeout. The test
# images therefore run httpd under a shell that exits on TERM, which keeps the
# suite fast; HTTPD_CMD is the plain command for tests that want the slow kind.
HTTPD_CMD = ["/bin/busybox", "httpd", "-f", "-p", "8000", "-h", "/www"]
PROMPT_STOP_CMD = ["/bin/busybox", "sh", "-c",
                   "trap 'exit 0' TERM; /bin/busybox httpd -f -p 8000 -h /www & wait"]
EXITS_CMD = ["/bin/busybox", "false"]
# HEALTHCHECK instructions: `docker import --change` accepts HEALTHCHECK on this
# engine (20.10; checked by hand), so no Dockerfile build or hand-written
# archive is needed. --start-period must not be given as 0 (docker rejects it).
HEALTHY_CHECK = ('HEALTHCHECK --interval=1s --timeout=2s --retries=3 '
                 'CMD ["/bin/busybox", "wget", "-q", "-O-", "http://127.0.0.1:8000/"]')
FAILING_CHECK = ('HEALTHCHECK --interval=1s --timeout=2s --retries=2 '
                 'CMD ["/bin/busybox", "false"]')

STARTUP_SECONDS = 15
IMAGE_LOCK = "/tmp/edd-test-images.lock"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "docker: needs a container engine; runs once per engine in "
                   "EDD_TEST_ENGINES (skipped without one, a failure when "
                   "EDD_REQUIRE_DOCKER=1)")
    config.addinivalue_line(
        "markers", "engines(*names, reason=...): run only on these engines")
    config.addinivalue_line(
        "markers", "no_engine_here: set by conftest; the test runs on none of this "
                   "session's engines and is deselected")


def pytest_collection_modifyitems(config, items):
    """Deselect the tests that run on none of this session's engines, and with
    EDD_TEST_ENGINE_TESTS_ONLY=1 (tests/run_engines.py sets it for every engine
    but the last) the tests that run on no engine at all: the last session runs them."""
    only_engine_tests = os.environ.get("EDD_TEST_ENGINE_TESTS_ONLY") == "1"
    kept = [item for item in items
            if not item.get_closest_marker("no_engine_here")
            and (not only_engine_tests or "docker" in getattr(item, "fixturenames", ()))]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def pytest_generate_tests(metafunc):
    """Every test that needs the engine (the `docker` fixture, directly, through
    make_image, or by the marker) runs once per engine: test_x[docker], test_x[podman]."""
    definition = metafunc.definition
    if "docker" not in metafunc.fixturenames and not definition.get_closest_marker("docker"):
        return
    if "docker" not in metafunc.fixturenames:
        metafunc.fixturenames.append("docker")
    engines = list(ENGINES)
    marker = definition.get_closest_marker("engines")
    if marker:
        assert marker.kwargs.get("reason"), "@pytest.mark.engines needs a reason="
        engines = [engine for engine in engines if engine in marker.args]
    if "faulty_docker" in metafunc.fixturenames:
        # The fault wrapper stands in front of the docker CLI: what it injects
        # (a CLI that fails, hangs or lies) is handled by edd the same way
        # whatever engine is behind it. This file's real-engine cases run on both.
        engines = [engine for engine in engines if engine == "docker"]
    if not engines:
        # This test has no engine it runs on in this session (EDD_TEST_ENGINES):
        # deselected, not skipped (tests/run_engines.py runs it in its own session).
        metafunc.parametrize("docker", [pytest.param(None, marks=pytest.mark.no_engine_here)],
                             indirect=True, scope="session")
        return
    metafunc.parametrize("docker", engines, indirect=True, scope="session", ids=engines)


@pytest.fixture(autouse=True)
def _engine_under_test(request):
    """docker_cli and the helpers follow the engine of the running test."""
    callspec = getattr(request.node, "callspec", None)
    ENGINE["cli"] = (callspec.params.get("docker") if callspec else None) or "docker"


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def free_port():
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique_name(prefix="t"):
    """A fresh deployment name: valid for docker and unlikely to collide."""
    return "%s-%s" % (prefix, secrets.token_hex(4))


RUN_ID = secrets.token_hex(3)


def run_tag(repo, version="v1"):
    """repo-<RUN_ID>:version, the same for the whole session.

    make_image uses tags verbatim, and a push re-creates an archive's tag in
    the engine; two test sessions sharing one engine (a developer and CI) would
    otherwise steal each other's tags and leave dangling images behind."""
    return "%s-%s:%s" % (repo, RUN_ID, version)


def docker_cli(*args, check=True, timeout=120, cli=None, **kwargs):
    """Run the CLI of the engine under test (or `cli`); with check=True, raise with its
    stderr on failure."""
    cli = cli or ENGINE["cli"]
    proc = subprocess.run([cli] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError("%s %s failed (%d): %s"
                             % (cli, " ".join(map(str, args)), proc.returncode, proc.stderr.strip()))
    return proc


def wait_for(predicate, timeout=10.0, interval=0.1, message="condition"):
    """Poll predicate() until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


def _http_get(port, path, timeout):
    # An explicit opener without proxies: a stray http_proxy must not reroute loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as reply:
        return reply.read().decode("utf-8", "replace")


def fetch(port, path="/", timeout=10):
    """GET http://127.0.0.1:port/path, retrying until it answers 200; return the text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _http_get(port, path, timeout=3)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() > deadline:
                raise AssertionError("nothing served on 127.0.0.1:%d%s within %ss: %r"
                                     % (port, path, timeout, exc))
            time.sleep(0.2)


def unreachable(port, path="/"):
    """True when an HTTP GET to 127.0.0.1:port gets no answer (refused, reset, ...)."""
    try:
        _http_get(port, path, timeout=2)
    except (OSError, http.client.HTTPException):
        return True
    return False


def container_state(name):
    """docker's status of the container called exactly `name`, or None."""
    proc = docker_cli("inspect", "--type", "container", "--format", "{{.State.Status}}",
                      name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_id(ref, cli=None):
    """The sha256:... id that `ref` points to, or None (podman's bare hex gets sha256:)."""
    proc = docker_cli("image", "inspect", "--format", "{{.Id}}", ref, check=False, cli=cli)
    if proc.returncode != 0:
        return None
    found = proc.stdout.strip()
    return found if found.startswith("sha256:") else "sha256:" + found


def container_labels(name):
    proc = docker_cli("inspect", "--type", "container", "--format",
                      "{{json .Config.Labels}}", name, check=False)
    return json.loads(proc.stdout) or {} if proc.returncode == 0 else None


# ---------------------------------------------------------------------------
# PKI (openssl CLI)
# ---------------------------------------------------------------------------

CA_CONFIG = """\
[ ca ]
default_ca = test_ca

[ test_ca ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
certificate = $dir/cert.crt
private_key = $dir/cert.key
default_md = sha256
default_days = 365
policy = policy_any
unique_subject = no
copy_extensions = none
email_in_dn = no

[ policy_any ]
commonName = supplied
"""


def _openssl(*args, cwd):
    proc = subprocess.run(["openssl"] + list(args), cwd=str(cwd), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode != 0:
        raise AssertionError("openssl %s: %s" % (" ".join(args), proc.stderr))
    return proc.stdout


class Pki:
    """A throwaway PKI: a CA, a server cert, and client certs, as files in `dir`."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self._clients = {}
        self.ca, self.ca_key = self._make_ca("ca", "edd test CA")
        self.other_ca, self.other_ca_key = self._make_ca("other-ca", "some other CA")
        self.server_cert, self.server_key = self._issue(
            "server", "localhost", "ca",
            ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             "extendedKeyUsage=serverAuth",
             "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        self.make_client("alice")
        self.make_client("bob", san="DNS:bob.example,email:bob@example.com")
        self.make_client("mallory", issuer="other-ca")
        self.make_client("expired", startdate="20200101000000Z", enddate="20210101000000Z")
        self.make_client("future", startdate="20400101000000Z", enddate="20410101000000Z")

    def client(self, name):
        """(certificate path, key path) of a client made by make_client."""
        return self._clients[name]

    def make_client(self, name, cn=None, san=None, issuer="ca", startdate=None, enddate=None,
                    eku="clientAuth"):
        extensions = ["basicConstraints=critical,CA:FALSE",
                      "keyUsage=critical,digitalSignature,keyEncipherment",
                      "extendedKeyUsage=%s" % eku]
        if san:
            extensions.append("subjectAltName=%s" % san)
        self._clients[name] = self._issue(name, cn or name, issuer, extensions,
                                          startdate, enddate)
        return self._clients[name]

    def _make_ca(self, stem, cn):
        ca_dir = self.dir / (stem + ".d")
        (ca_dir / "newcerts").mkdir(parents=True)
        (ca_dir / "index.txt").write_text("")
        (ca_dir / "serial").write_text("%s\n" % secrets.token_hex(8))
        (ca_dir / "ca.cnf").write_text(CA_CONFIG.format(dir=ca_dir))
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", "cert.key", "-out", "cert.crt", "-days", "3650",
                 "-subj", "/CN=%s" % cn,
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=ca_dir)
        shutil.copy(str(ca_dir / "cert.crt"), str(self.dir / (stem + ".crt")))
        shutil.copy(str(ca_dir / "cert.key"), str(self.dir / (stem + ".key")))
        return self.dir / (stem + ".crt"), self.dir / (stem + ".key")

    def _issue(self, stem, cn, issuer, extensions, startdate=None, enddate=None):
        """Sign a fresh EC key for CN=cn with `openssl ca` (it takes -startdate/-enddate)."""
        ca_dir = self.dir / (issuer + ".d")
        crt, key, csr = (self.dir / (stem + ext) for ext in (".crt", ".key", ".csr"))
        ext_file = self.dir / (stem + ".ext")
        ext_file.write_text("[ ext ]\n" + "\n".join(extensions) + "\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=%s" % cn,
                 cwd=self.dir)
        validity = []
        if startdate:
            validity += ["-startdate", startdate]
        if enddate:
            validity += ["-enddate", enddate]
        else:
            validity += ["-days", "365"]
        _openssl("ca", "-batch", "-notext", "-config", str(ca_dir / "ca.cnf"),
                 "-in", str(csr), "-out", str(crt), "-extfile", str(ext_file),
                 "-extensions", "ext", *validity, cwd=self.dir)
        return crt, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------
# Docker engine gate and test images
# ---------------------------------------------------------------------------

class EngineVersion(str):
    """The engine's version (what `docker` fixtures compare), knowing its CLI's name."""
    cli = "docker"


@pytest.fixture(scope="session")
def docker(request):
    """The engine under test (request.param: docker or podman) answers `info`, or the
    test is skipped (failed when EDD_REQUIRE_DOCKER=1). Returns its EngineVersion."""
    cli = getattr(request, "param", None) or "docker"
    version_format = {"podman": "{{.Version.Version}}"}.get(cli, "{{.ServerVersion}}")
    try:
        proc = subprocess.run([cli, "info", "--format", version_format],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=30)
        problem = None if proc.returncode == 0 else (proc.stderr.strip() or "info failed")
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = "%s info: %s" % (cli, exc)
    if problem:
        if os.environ.get("EDD_REQUIRE_DOCKER") == "1":
            pytest.fail("EDD_REQUIRE_DOCKER=1 but no %s engine: %s" % (cli, problem),
                        pytrace=False)
        pytest.skip("no %s engine: %s" % (cli, problem))
    version = EngineVersion(proc.stdout.strip())
    version.cli = cli
    return version


def _rootfs_tar(content):
    """A rootfs: /bin/busybox (+ /bin/sh) and /www/index.html holding `content`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def add_dir(path):
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        def add_file(path, data, mode=0o644):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        for directory in ("bin", "www", "tmp"):
            add_dir(directory)
        add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in ("sh", "wget", "httpd"):
            link = tarfile.TarInfo("bin/" + applet)
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
        add_file("www/index.html", content.encode())
    return out.getvalue()


class ImageFactory:
    """Builds `docker save` archives of tiny busybox images, once per session."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self._cache = {}
        self._ids = {}
        self.tags = set()

    def __call__(self, tag, content="hello from edd tests", cmd=None, healthcheck=None,
                 exits=False, gzip=False):
        key = (tag, content, tuple(cmd or ()), healthcheck, exits, gzip)
        if key not in self._cache:
            if exits:
                cmd = EXITS_CMD
            changes = ["CMD " + json.dumps(cmd or PROMPT_STOP_CMD)]
            if healthcheck:
                changes.append(healthcheck)
            self._cache[key] = self._build([(tag, content, changes)], gzip)
        return self._cache[key]

    def multi(self, images, gzip=False):
        """One archive holding several images: images = [(tag, content), ...]."""
        key = ("multi", tuple(images), gzip)
        if key not in self._cache:
            specs = [(tag, content, ["CMD " + json.dumps(PROMPT_STOP_CMD)])
                     for tag, content in images]
            self._cache[key] = self._build(specs, gzip)
        return self._cache[key]

    def image_id(self, archive):
        """The sha256:... id of the (first) image in an archive made here."""
        return self._ids[Path(archive)][0]

    def image_ids(self, archive):
        return list(self._ids[Path(archive)])

    def _build(self, specs, gzip):
        archive = self.dir / ("image-%s.tar%s" % (secrets.token_hex(4), ".gz" if gzip else ""))
        tags = [tag if ":" in tag.rsplit("/", 1)[-1] else tag + ":latest"
                for tag, _, _ in specs]
        self.tags.update(tags)
        # Other test sessions may share this engine: hold a lock from import to
        # rmi so that nobody retags one of our tags in between.
        with open(IMAGE_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            builder = image_builder()
            ids = []
            for (tag, content, changes), ref in zip(specs, tags):
                build_image(builder, ref, _rootfs_tar(content), changes, self.dir)
                ids.append(image_id(ref, cli=builder))
            saved = self.dir / "saving.tar"
            # podman saves one image unless told -m; both write docker's layout.
            many = ["-m"] if builder == "podman" and len(tags) > 1 else []
            docker_cli("save", *many, "-o", saved, *tags, cli=builder)
            docker_cli("rmi", *tags, cli=builder)
        if gzip:
            with open(str(saved), "rb") as src, gzip_module.open(str(archive), "wb") as dst:
                shutil.copyfileobj(src, dst)
            saved.unlink()
        else:
            saved.rename(archive)
        self._ids[archive] = ids
        return archive


@pytest.fixture(scope="session")
def image_factory(tmp_path_factory):
    """One ImageFactory for all engines: the archives are built once, with BUILDER."""
    return ImageFactory(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def make_image(docker, image_factory):
    yield image_factory
    # Pushes re-create the archive's own tags through `load`; drop them from this
    # engine (podman's `rmi -f` would also remove containers: never -f there).
    if image_factory.tags:
        force = [] if is_podman(docker.cli) else ["-f"]
        docker_cli("rmi", *force, *sorted(image_factory.tags), check=False, cli=docker.cli)


# ---------------------------------------------------------------------------
# A running edd
# ---------------------------------------------------------------------------

class Deployment(dict):
    """A deployment's config entry that also knows its name and published host port."""

    @property
    def name(self):
        return self["name"]

    port = None


class Edd:
    """One edd process started from a config file in a test's tmp_path."""

    def __init__(self, factory, config, config_path, log_path):
        self.factory = factory
        self.config = config
        self.config_path = Path(config_path)
        self.log_path = Path(log_path)
        self.proc = None
        self.command = [sys.executable, str(EDD)]     # a test may run edd as another user
        self.port = int(config["listen"].rsplit(":", 1)[1])
        self.url = "https://127.0.0.1:%d" % self.port

    def launch(self):
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(str(self.log_path), "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command + ["--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=str(self.config_path.parent))
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("edd exited with %s at startup:\n%s"
                                     % (self.proc.returncode, self.log()))
            if "listening" in self.log()[self._log_offset:] and self._accepts():
                return self
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("edd did not start listening within %ss:\n%s"
                                     % (STARTUP_SECONDS, self.log()))
            time.sleep(0.05)

    def _accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self):
        """Everything this edd (and earlier launches with the same log) wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout=20):
        """SIGTERM and wait; return the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def kill(self):
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def relaunch(self):
        """Start edd again with the same config file (after stop or kill)."""
        assert self.proc is None or self.proc.poll() is not None, "edd still running"
        return self.launch()

    def reload(self, new_config):
        """Rewrite the config file and send SIGHUP."""
        new_config = dict(new_config)
        new_config.setdefault("listen", self.config["listen"])    # same port unless told
        self.config = self.factory._complete(new_config)
        self.factory._track(self.config)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.proc.send_signal(signal.SIGHUP)


class EddFactory:
    def __init__(self, tmp_path, pki):
        self.tmp_path = Path(tmp_path)
        self.pki = pki
        self.instances = []
        self.names = set()
        self.command = None     # argv that runs edd.py, when not this Python

    def deployment(self, name=None, **settings):
        """A deployment publishing container port 8000 on 127.0.0.1:<free port>.

        settle_seconds defaults to 0.5 to keep the suite fast; pass
        settle_seconds=None to leave it out (edd's default applies)."""
        settings.setdefault("settle_seconds", 0.5)
        port = settings.pop("port", None) or free_port()
        entry = Deployment(name=name or unique_name())
        entry["args"] = ["-p", "127.0.0.1:%d:8000" % port] + list(settings.pop("args", []))
        entry.update((k, v) for k, v in settings.items() if v is not None)
        entry.port = port
        self.names.add(entry.name)
        return entry

    def _complete(self, config):
        config = dict(config)
        if ENGINE["cli"] == "podman":
            config.setdefault("docker", "podman")
        config.setdefault("listen", "127.0.0.1:%d" % free_port())
        config.setdefault("server_cert", str(self.pki.server_cert))
        config.setdefault("server_key", str(self.pki.server_key))
        config.setdefault("client_ca", str(self.pki.ca))
        config.setdefault("deployments", [])
        # One state dir per test: the edd processes of a test share swap records and locks.
        config.setdefault("state_dir", str(self.tmp_path / "state"))
        return config

    def _track(self, config):
        for entry in config.get("deployments", []):
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                self.names.add(entry["name"])

    def start(self, deployments=(), **toplevel):
        """Write a config (the test PKI, a free loopback port) and start edd on it."""
        number = len(self.instances)
        config = self._complete(dict(toplevel, deployments=list(deployments)))
        self._track(config)
        config_path = self.tmp_path / ("edd-%d.json" % number)
        config_path.write_text(json.dumps(config, indent=2))
        edd = Edd(self, config, config_path, self.tmp_path / ("edd-%d.log" % number))
        edd.command = list(self.command or edd.command)
        self.instances.append(edd)
        return edd.launch()

    def cleanup(self):
        for edd in self.instances:
            edd.stop()
        remove_deployment_objects(self.names)


def remove_deployment_objects(names):
    """Remove every container and edd image of these deployments (quietly).

    Two listing calls for all names, then removals only if something is left:
    teardown runs after every test, so it must be cheap."""
    names = set(names)
    if not names:
        return
    label = ('{{index .Labels "edd.deployment"}}' if is_podman()
             else '{{.Label "edd.deployment"}}')
    try:
        listing = docker_cli("ps", "-a", "--format", "{{.Names}}\t" + label, check=False)
    except OSError:         # no docker CLI at all: nothing can have been created
        return
    if listing.returncode != 0:
        return
    containers = []
    for line in listing.stdout.splitlines():
        container, _, label = line.partition("\t")
        if label in names or container in names or \
                container.endswith(".edd-old") and container[:-8] in names:
            containers.append(container)
    if containers:
        docker_cli("rm", "-f", *containers, check=False)
    refs = [ref for ref in docker_cli("images", "--format", "{{.Repository}}:{{.Tag}}",
                                      check=False).stdout.split()
            if _local(ref).startswith("edd/") and _local(ref)[4:].split(":")[0] in names]
    if refs:
        docker_cli("rmi", *([] if is_podman() else ["-f"]), *refs, check=False)


@pytest.fixture
def edd_factory(tmp_path, pki):
    """Start edd processes for one test; all are stopped and cleaned up after it."""
    factory = EddFactory(tmp_path, pki)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def module_edd_factory(tmp_path_factory, pki):
    """Like edd_factory, shared by a module's tests (for read-only checks)."""
    factory = EddFactory(tmp_path_factory.mktemp("edd"), pki)
    yield factory
    factory.cleanup()


# ---------------------------------------------------------------------------
# Clients: the real curl, http.client, raw TLS sockets
# ---------------------------------------------------------------------------

Response = collections.namedtuple(
    "Response", "status headers body json returncode stderr elapsed")
Response.__doc__ = """status 0 means no HTTP response at all (see returncode/stderr)."""


def _decode_json(body):
    try:
        return json.loads(body)
    except ValueError:
        return None


def _base_url(edd):
    return edd if isinstance(edd, str) else edd.url


def _pki_of(edd):
    return edd.factory.pki


def _parse_header_dump(text):
    """The last response's headers from curl -D (skipping 100 Continue blocks)."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    headers = {}
    if blocks:
        for line in blocks[-1].split("\n")[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
    return headers


def curl(edd, method, path, *, cert="alice", upload=None, chunked=True, headers=(),
         extra=(), timeout=180, pki=None):
    """Run the real curl the way the README's push does; return a Response.

    upload: a file path. chunked=True pipes it to `curl -T -` through a pipe
    (exactly `docker save ... | curl -T -`: chunked + Expect: 100-continue);
    chunked=False uses `-T FILE`, which sends Content-Length."""
    pki = pki or _pki_of(edd)
    work = Path(edd.config_path.parent if not isinstance(edd, str) else "/tmp")
    token = secrets.token_hex(4)
    head_file, body_file = work / ("curl-%s.head" % token), work / ("curl-%s.body" % token)
    argv = ["curl", "-sS", "--noproxy", "*", "--cacert", str(pki.ca)]
    if cert:
        crt, key = pki.client(cert)
        argv += ["--key", str(key), "--cert", str(crt)]
    argv += ["-X", method]
    for header in headers:
        argv += ["-H", header]
    stdin = subprocess.DEVNULL
    if upload is not None:
        argv += ["-H", "Content-Type:application/x-tar"]
        argv += ["-T", "-"] if chunked else ["-T", str(upload)]
        if chunked:
            stdin = subprocess.PIPE
    argv += ["-D", str(head_file), "-o", str(body_file), "-w", "%{http_code}"]
    argv += list(extra)
    argv.append(_base_url(edd) + path)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    feeder = None
    if stdin == subprocess.PIPE:
        def feed():
            try:
                with open(str(upload), "rb") as src:
                    shutil.copyfileobj(src, proc.stdin, 65536)
            except BrokenPipeError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    try:
        # Not communicate(): it would also write/close stdin that `feed` owns.
        stdout = proc.stdout.read()
        stderr = proc.stderr.read()
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    elapsed = time.monotonic() - started
    if feeder:
        feeder.join(10)
    body = body_file.read_bytes().decode("utf-8", "replace") if body_file.exists() else ""
    head = head_file.read_text(errors="replace") if head_file.exists() else ""
    for leftover in (head_file, body_file):
        if leftover.exists():
            leftover.unlink()
    try:
        status = int(stdout.decode().strip() or 0)
    except ValueError:
        status = 0
    return Response(status, _parse_header_dump(head), body, _decode_json(body),
                    proc.returncode, stderr.decode("utf-8", "replace"), elapsed)


def client_context(pki, cert="alice"):
    """An ssl context that trusts the test CA and presents `cert` (None: no cert)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        crt, key = pki.client(cert)
        context.load_cert_chain(str(crt), str(key))
    return context


def https_request(edd, method, path, *, cert="alice", body=None, headers=None, timeout=60,
                  encode_chunked=False):
    """One request with http.client over mutual TLS; return a Response."""
    context = client_context(_pki_of(edd), cert)
    conn = http.client.HTTPSConnection("127.0.0.1", edd.port, context=context, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}),
                     encode_chunked=encode_chunked)
        reply = conn.getresponse()
        raw = reply.read()
        text = raw.decode("utf-8", "replace")
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, text,
                        _decode_json(text), 0, "", time.monotonic() - started)
    finally:
        conn.close()


def tls_connect(edd, cert="alice", timeout=10):
    """A raw TLS socket to edd (handshake done) for hand-made HTTP framing."""
    context = client_context(_pki_of(edd), cert)
    sock = socket.create_connection(("127.0.0.1", edd.port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def read_response(sock):
    """Read one HTTP response from a socket (until the server closes or the body ends)."""
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    raw = reply.read()
    text = raw.decode("utf-8", "replace")
    return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, text,
                    _decode_json(text), 0, "", 0.0)


def children(pid):
    """Command lines of the live child processes of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                found.append(cmdline.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return found


def docker_load_running(edd):
    """Whether edd has a `docker load` child running."""
    return any(" load" in argv for argv in children(edd.proc.pid))


def push(edd, deployment, archive, chunked=True, query="", cert="alice", method="POST",
         **kwargs):
    """Upload `archive` to the deployment's /load with the real curl; the Response."""
    return curl(edd, method, "/v1/deployments/%s/load%s" % (deployment.name, query),
                upload=archive, chunked=chunked, cert=cert, **kwargs)


def assert_ok(reply):
    """The JSON of a 200 answer; otherwise fail with the status and the body."""
    assert reply.status == 200, "%s\n%s" % (reply.status, reply.body or reply.stderr)
    return reply.json


def push_until_parked(edd, deployment, archive):
    """Push in a thread; return (thread, replies) once the old container is parked."""
    replies = []
    pusher = threading.Thread(target=lambda: replies.append(push(edd, deployment, archive)),
                              daemon=True)
    pusher.start()
    wait_for(lambda: container_state(deployment.name + ".edd-old"), timeout=30,
             message="the old container to be parked")
    return pusher, replies


def read_all(body, size=7):
    """Everything a ChunkedBody or LengthBody yields, read `size` bytes at a time."""
    view = memoryview(bytearray(size))
    out = b""
    while True:
        count = body.readinto(view)
        if not count:
            return out
        out += bytes(view[:count])


# ---------------------------------------------------------------------------
# Issue 9 (archive isolation): archives rewritten by hand, images sharing layers
# ---------------------------------------------------------------------------

def rewrite_archive(source, target, tags=None, drop=(), replace=None, gzip=False):
    """Copy the `docker save` archive `source` (plain or gzip'd) to `target`, with
    manifest.json's RepoTags (and `repositories`) set to `tags` when given, the
    members named in `drop` left out, and those in `replace` ({name: bytes}) given
    new contents. Returns `target` (a Path)."""
    replace = dict(replace or {})
    with tarfile.open(str(source)) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None)
                   for m in tar.getmembers()]
    by_name = {m.name: data for m, data in members}
    if tags is not None:
        manifest = json.loads(by_name["manifest.json"])
        for entry in manifest:
            entry["RepoTags"] = list(tags)
        replace["manifest.json"] = json.dumps(manifest).encode()
        repositories = {}
        for tag in tags:
            repo, _, version = tag.rpartition(":")
            repositories.setdefault(repo, {})[version] = "0" * 64
        replace["repositories"] = json.dumps(repositories).encode()
    opener = gzip_module.open if gzip else open
    with opener(str(target), "wb") as raw, tarfile.open(fileobj=raw, mode="w") as out:
        for member, data in members:
            if member.name in drop:
                continue
            if member.name in replace:
                data = replace.pop(member.name)
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return Path(target)


def save_archive(path, *refs, gzip=False):
    """`docker save refs` into `path` (gzip'd if asked); returns the Path."""
    saved = Path(str(path) + ".saving")
    docker_cli("save", "-o", saved, *refs)
    if gzip:
        rewrite_archive(saved, path, gzip=True)
        saved.unlink()
    else:
        saved.rename(path)
    return Path(path)


def commit_image(base, tag, content, cmd=None):
    """An image on top of `base` with one more layer, /www/index.html = `content`,
    made with docker create, cp and commit (so it shares base's layers); its ID."""
    container = docker_cli("create", base).stdout.strip()
    try:
        page = Path("/tmp/edd-test-page-%s" % secrets.token_hex(4))
        page.write_text(content)
        try:
            docker_cli("cp", page, "%s:/www/index.html" % container)
        finally:
            page.unlink()
        docker_cli("commit", "-c", "CMD " + json.dumps(cmd or PROMPT_STOP_CMD),
                   container, tag)
    finally:
        docker_cli("rm", "-f", container, check=False)
    return image_id(tag)


def image_layers(ref):
    """The diff IDs of an image's layers, base first (None if there is no such image)."""
    proc = docker_cli("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref,
                      check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def archive_layer_members(archive):
    """manifest.json's Layers of the first image of a `docker save` archive."""
    with tarfile.open(str(archive)) as tar:
        return json.loads(tar.extractfile("manifest.json").read())[0]["Layers"]


def oci_archive(source, target, tags, compress=True):
    """The image of `docker save` archive `source` rewritten in the OCI layout that
    newer engines write: blobs/sha256/<digest> (layers gzip'd and so named by their
    compressed digest when `compress`, as a containerd store does), index.json
    naming the image in annotations, oci-layout, and manifest.json with RepoTags."""
    with tarfile.open(str(source)) as tar:
        entry = json.loads(tar.extractfile("manifest.json").read())[0]
        config = tar.extractfile(entry["Config"]).read()
        layers = [tar.extractfile(tar.getmember(name)).read() for name in entry["Layers"]]
    blobs = {}

    def blob(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs["blobs/sha256/" + digest[7:]] = data
        return digest, "blobs/sha256/" + digest[7:]
    if compress:
        layers = [gzip_module.compress(layer, mtime=0) for layer in layers]
    layer_blobs = [blob(layer) for layer in layers]
    config_digest, config_path = blob(config)
    image_manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar"
                                 + ("+gzip" if compress else ""),
                    "digest": digest, "size": len(layer)}
                   for (digest, _), layer in zip(layer_blobs, layers)]}).encode()
    manifest_digest, _ = blob(image_manifest)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": len(image_manifest),
        "annotations": {"io.containerd.image.name": tag,
                        "org.opencontainers.image.ref.name": tag.rpartition(":")[2]}}
        for tag in tags]}
    files = sorted(blobs.items()) + [
        ("index.json", json.dumps(index).encode()),
        ("manifest.json", json.dumps([{"Config": config_path, "RepoTags": list(tags),
                                       "Layers": [path for _, path in layer_blobs]}]).encode()),
        ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')]
    with tarfile.open(str(target), "w") as out:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return Path(target)


# ---------------------------------------------------------------------------
# Engines (issue 14): every engine test runs on docker and on podman
# ---------------------------------------------------------------------------
# EDD_TEST_ENGINES: the engines to test, comma-separated (default both). With
# EDD_REQUIRE_DOCKER=1 each one must answer: a missing podman fails, not skips.
# ENGINE["cli"]: the CLI of the running test's engine; docker_cli, image_id,
# EddFactory (its config's "docker") and the clean-up follow it.
# image_builder(): the CLI that builds make_image's archives (EDD_TEST_BUILDER,
# or docker when it answers: its import takes HEALTHCHECK; else podman build,
# FROM scratch). Every engine's tests load those same docker-layout archives.

ENGINES = [e for e in os.environ.get("EDD_TEST_ENGINES", "docker,podman").split(",") if e]
ENGINE = {"cli": "docker"}
_BUILDER = []


def image_builder():
    if not _BUILDER and os.environ.get("EDD_TEST_BUILDER"):
        _BUILDER.append(os.environ["EDD_TEST_BUILDER"])
    if not _BUILDER:
        docker_answers = shutil.which("docker") and subprocess.run(
            ["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=30).returncode == 0
        _BUILDER.append("docker" if docker_answers else "podman")
    return _BUILDER[0]


def build_image(builder, ref, rootfs, changes, directory):
    """Tag `ref` in `builder`'s store: `rootfs` (a tar) plus Dockerfile `changes`."""
    if builder == "docker":
        argv = ["docker", "import"]
        for change in changes:
            argv += ["--change", change]
        proc = subprocess.run(argv + ["-", ref], input=rootfs, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
    else:
        context = Path(tempfile.mkdtemp(dir=str(directory)))
        (context / "rootfs.tar").write_bytes(rootfs)
        (context / "Containerfile").write_text(
            "FROM scratch\nADD rootfs.tar /\n" + "\n".join(changes) + "\n")
        proc = subprocess.run(["podman", "build", "-q", "--format", "docker", "-t", ref,
                               str(context)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=120)
        shutil.rmtree(str(context))
    if proc.returncode != 0:
        raise AssertionError("%s: building %s: %s" % (builder, ref, proc.stderr.decode()))


def is_podman(cli=None):
    """Whether `cli` (default: the running test's engine) is podman, or a wrapper of it."""
    return "podman" in os.path.basename(cli or ENGINE["cli"])


def _local(ref):
    """podman's name for a local image, as docker spells it: localhost/x:y is x:y."""
    return ref[len("localhost/"):] if ref.startswith("localhost/") else ref


# ---------------------------------------------------------------------------
# Swap faults (issue 10): a docker CLI that fails on cue, a state dir per test
# ---------------------------------------------------------------------------

class FaultyDocker:
    """tests/faulty_docker.py behind a shim in `directory`: give `.path` to edd as its
    `docker`; `.set(rules)` arms faults (see that file), `.calls()` lists what ran."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "docker"
        self.path.write_text('#!/bin/sh\nexec "%s" "%s" "%s" "$@"\n' % (
            sys.executable, REPO / "tests" / "faulty_docker.py", self.dir))
        self.path.chmod(0o755)

    def set(self, *rules):
        """Replace the rules; matches are counted afresh from now on."""
        for name in ("counts.json", "calls.log"):
            if (self.dir / name).exists():
                (self.dir / name).unlink()
        staging = self.dir / "rules.json.new"
        staging.write_text(json.dumps(list(rules)))
        os.replace(str(staging), str(self.dir / "rules.json"))

    def calls(self, action=None):
        """[(action, argument line)] of every call since the last set(), in order."""
        try:
            lines = (self.dir / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        found = [tuple(line.split(" ", 1)) for line in lines]
        return [c for c in found if action is None or c[0] == action]


@pytest.fixture
def faulty_docker(tmp_path):
    return FaultyDocker(tmp_path / "faulty-docker")


# ---------------------------------------------------------------------------
# Issue 15 (release command): a prober that sees every failed request
# ---------------------------------------------------------------------------

class Prober(threading.Thread):
    """GETs a port every 20 ms until stopped; records every failed probe."""

    def __init__(self, port, expected):
        super().__init__(daemon=True)
        self.port, self.expected = port, expected
        self.answered, self.failures = 0, []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                text = _http_get(self.port, "/", timeout=5)
                if text == self.expected:
                    self.answered += 1
                else:
                    self.failures.append("served %r" % text)
            except Exception as exc:   # refused, reset, timed out: all count as failed
                self.failures.append(repr(exc))
            time.sleep(0.02)

    def stop(self):
        self.halt.set()
        self.join(10)
