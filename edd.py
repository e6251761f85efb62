#!/usr/bin/env python3
"""edd: push a container image to this host over mutual TLS, and run it.

    docker save website:latest | curl --cacert ca.crt --cert client.crt --key client.key \\
        -X POST -H "Content-Type:application/x-tar" -T - \\
        https://host:8866/v1/deployments/website/load

or, sending only the layers the host's deployment does not have yet (the same file
is the client; `edd.py push --help`):

    edd.py push website:latest https://host:8866/v1/deployments/website

Several URLs (or --targets FILE) make a rollout: every host is asked first and
none changes unless all answer; then one at a time (--parallel N), and if a
deploy fails, the hosts this push already updated are rolled back to exactly
the image they ran before (see "Many hosts" in README.md).

The upload streams into `docker load`; edd then swaps the deployment's container
for one running the new image, with the `docker run` options fixed in the host's
config. Promise: after a push, the new image runs and passed its health gate, or
the previous container runs exactly as it did before, and the client is told which
("restored": true, as checked with docker afterwards; false, with what is there,
when docker would not let edd put it back). Each swap is recorded in state_dir,
so a crash in the middle is completed when edd starts again.
A deployment's `release_command` (migrations, say) first runs in a one-off
container from the new image while the old one serves; if it fails, nothing changes.

API (JSON in and out; errors are {"error": "..."}):
    GET        /v1/deployments                     the deployments this client may use
    GET        /v1/deployments/NAME                one deployment's state
    POST|PUT   /v1/deployments/NAME/load           body: docker save archive (.tar, .tar.gz)
    POST       /v1/deployments/NAME/layers         body: {"image_id", "layers"}: how many
                                                   leading layers its own images have
                                                   (409 while the deployment is busy)
    POST       /v1/deployments/NAME/start|stop|restart|rollback
    DELETE     /v1/deployments/NAME                stop and remove the container
    GET        /v1/deployments/NAME/logs?tail=N    the container's recent output (text,
                                                   streamed, at most max_log_bytes)
    GET        /v1/health                          edd and the engine answer: its name,
                                                   version and image store
    GET        /metrics                            Prometheus text format (the series
                                                   of deployments this client may use)
    /v1/NAME/ACTION is accepted as an alias of /v1/deployments/NAME/ACTION.
    HEAD works wherever GET does (headers only); other methods get 405 with Allow.

Threat model: mutual TLS proves that a client holds a key certified by client_ca,
valid now; `clients` and `admins` name typed identities (CN, dns:, email:) that
may touch a deployment, and to anyone else it does not exist (404). A client
chooses only the image: what the container may do is fixed by the host's config.
An image is code: whoever may push to a deployment runs code with its `args`.
An upload changes its own deployment and nothing else: the names in the archive
are removed before `docker load` sees them (edd tags only edd/NAME:current and
:previous, and reports them as "ignored_tags"), and a layer the archive leaves
out is accepted only if the deployment's own images have it (else 403).
Connections, handshakes, uploads and log output are bounded, so one client
cannot starve the others.

The engine is Docker (20.10, and 25-29 on either image store) or Podman, rootful
or rootless: the `docker` key names the CLI, and edd asks it which engine it is.

Supports CPython 3.8 and newer; standard library only.
"""

import argparse
import bisect
import contextlib
import collections
import dataclasses
import datetime
import fcntl
import hashlib
import heapq
import http.client
import http.server
import itertools
import json
import logging
import os
import posixpath
import queue
import re
import secrets
import select
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib

__version__ = "0.1.0"

DEFAULT_CONFIG = "/etc/edd/config.json"
BUFFER_SIZE = 1 << 20          # bytes moved from the socket to `docker load` at a time
PIPE_SIZE = 1 << 20            # asked of the kernel for the pipe into `docker load`
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)   # Python < 3.10 lacks the name
MAX_CHUNK_LINE = 1024          # a chunk-size line longer than this is not HTTP
LOG_TAIL_LINES = 20            # lines of a failed container's log sent to the client
MAX_LOG_TAIL = 10000
MAX_JSON_BODY = 64 << 10       # a /layers request lists at most a few hundred layers
LINGER_SECONDS = 2             # how long a closing connection drains unread bytes
LINGER_BYTES = 1 << 20
POLL_SECONDS = 0.25            # how often the gate looks at a settling container
HEALTH_POLL_SECONDS = 0.5      # and then at one whose HEALTHCHECK is still starting
DOCKER_TIMEOUT = 60            # seconds for a docker call that does not wait on a container
STOP_MARGIN_SECONDS = 15       # added to stop_timeout_seconds for stop, restart and rm -f
LOG_TIMEOUT = 10               # collecting a failed container's log must not stall the undo
UNDO_TRIES = 4                 # attempts at each undo step, 0.5 s, 1 s, 2 s apart
RETRY_SECONDS = 0.5

# A deployment name is a container name and an image repository component, so
# it must satisfy both of docker's grammars (the container one wants 2+ chars).
NAME_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
PARKED_SUFFIX = ".edd-old"
LABEL = "edd.deployment"
SWAP_LABEL = "edd.swap"        # marks the container a swap creates, found even without its ID
RELEASE_SUFFIX = ".edd-release"  # the one-off container that runs release_command
RELEASE_LABEL = "edd.release"    # on it, naming the deployment: crash leftovers are found by it
RELEASE_TAIL_LINES = 100         # lines of the release command's output kept for the client
RELEASE_LINE_BYTES = 4096        # a longer line is kept in pieces: memory stays bounded
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
MUTATING = frozenset(["load", "start", "stop", "restart", "rollback", "delete"])

log = logging.getLogger("edd")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class EddError(Exception):
    """An error with the HTTP status the client gets; `extra` joins the JSON body."""
    status = 500

    def __init__(self, message, status=None, **extra):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.extra = extra


class BadRequest(EddError):
    status = 400


class Forbidden(EddError):
    status = 403


class NotFound(EddError):
    status = 404


class NotAllowed(NotFound):
    """A deployment this client may not use: answered exactly like an unknown one,
    so that names cannot be probed; the audit line says what really happened."""


class MethodNotAllowed(EddError):
    status = 405

    def __init__(self, allowed):
        super().__init__("method not allowed; allowed: " + ", ".join(allowed))
        self.allowed = allowed


class Conflict(EddError):
    status = 409


class Misdirected(EddError):
    """421: this connection cannot serve the request; a new one can (RFC 9110)."""
    status = 421


class LengthRequired(EddError):
    status = 411


class PayloadTooLarge(EddError):
    status = 413


class DockerError(EddError):
    """The docker CLI failed; the message is docker's own."""
    status = 502


class ServiceUnavailable(EddError):
    status = 503


class ClientGone(Exception):
    """The client closed, stalled or cut its upload short: no one to answer."""


class ConfigError(Exception):
    """The config cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    args: tuple = ()
    command: tuple = ()
    clients: frozenset = None          # None: any certificate from client_ca
    settle_seconds: float = 2.0
    health_timeout_seconds: float = 60.0
    stop_timeout_seconds: int = 10
    release_command: tuple = ()
    release_timeout_seconds: float = 300.0

    @property
    def container(self):
        return self.name

    @property
    def parked_container(self):
        return self.name + PARKED_SUFFIX

    @property
    def release_container(self):
        return self.name + RELEASE_SUFFIX

    def tag(self, which):
        return "edd/%s:%s" % (self.name, which)


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    deployments: dict
    listen: tuple = ("0.0.0.0", 8866)
    server_cert: str = "/etc/edd/server.crt"
    server_key: str = "/etc/edd/server.key"
    client_ca: str = "/etc/edd/ca.crt"
    admins: frozenset = frozenset()
    metrics_clients: frozenset = frozenset()
    max_upload_bytes: int = 8 << 30
    body_timeout_seconds: float = 60.0
    upload_min_bytes_per_second: int = 64 << 10
    handshake_timeout_seconds: float = 10.0
    header_timeout_seconds: float = 30.0
    max_connections: int = 64
    max_handshakes: int = 32
    max_log_bytes: int = 1 << 20
    docker: str = "docker"
    state_dir: str = "/var/lib/edd"


TOP_KEYS = {
    # key: (type, check of the value or None)
    "listen": (str, None),
    "server_cert": (str, None),
    "server_key": (str, None),
    "client_ca": (str, None),
    "deployments": (list, None),
    "admins": (list, "identities"),
    "metrics_clients": (list, "identities"),
    "max_upload_bytes": (int, "positive"),
    "body_timeout_seconds": (float, "positive"),
    "upload_min_bytes_per_second": (int, "non-negative"),
    "handshake_timeout_seconds": (float, "positive"),
    "header_timeout_seconds": (float, "positive"),
    "max_connections": (int, "positive"),
    "max_handshakes": (int, "positive"),
    "max_log_bytes": (int, "positive"),
    "docker": (str, None),
    "state_dir": (str, None),
}
DEPLOYMENT_KEYS = {
    "name": (str, None),
    "args": (list, "strings"),
    "command": (list, "strings"),
    "clients": (list, "identities"),
    "settle_seconds": (float, "non-negative"),
    "health_timeout_seconds": (float, "positive"),
    "stop_timeout_seconds": (int, "non-negative"),
    "release_command": (list, "strings"),
    "release_timeout_seconds": (float, "positive"),
}
# docker run options that would break how edd names, finds and swaps containers.
FORBIDDEN_ARGS = ("--name", "--rm", "--label", "-l", "--detach", "-d")


def _check_value(value, kind, rule, where):
    """Return `value` if it has type `kind` and obeys `rule`; raise ConfigError otherwise."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    names = {str: "a string", list: "a list", int: "an integer", float: "a number"}
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError("%s: must be %s" % (where, names[kind]))
    if rule in ("strings", "identities") and not all(isinstance(v, str) for v in value):
        raise ConfigError("%s: must be a list of strings" % where)
    if rule == "identities":
        for identity in value:
            _check_identity(identity, where)
    if rule == "positive" and value <= 0:
        raise ConfigError("%s: must be greater than 0" % where)
    if rule == "non-negative" and value < 0:
        raise ConfigError("%s: must not be negative" % where)
    return value


IDENTITY_FORMS = ("an identity is a certificate's subject CN written as is (\"alice\"), "
                  "a DNS subjectAltName as \"dns:NAME\", or an email subjectAltName as "
                  "\"email:ADDRESS\"")


def _check_identity(identity, where):
    kind, colon, value = identity.partition(":")
    if not identity.strip() or identity != identity.strip():
        raise ConfigError("%s: %r is not an identity; %s" % (where, identity, IDENTITY_FORMS))
    if colon and re.match(r"[A-Za-z]+\Z", kind) and (kind not in ("dns", "email") or not value):
        raise ConfigError("%s: %r has an unknown or empty kind; %s"
                          % (where, identity, IDENTITY_FORMS))


def _take(raw, schema, where):
    """Validate the keys of object `raw` against `schema`; return {key: value}."""
    if not isinstance(raw, dict):
        raise ConfigError("%s: must be an object" % (where or "top level"))
    for key in raw:
        if key not in schema:
            raise ConfigError("%s%s: unknown key" % (where and where + ".", key))
    return {key: _check_value(value, schema[key][0], schema[key][1],
                              (where and where + ".") + key)
            for key, value in raw.items()}


def _parse_listen(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("listen: must be HOST:PORT, e.g. 0.0.0.0:8866")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_deployment(raw, where):
    fields = _take(raw, DEPLOYMENT_KEYS, where)
    name = fields.get("name")
    if name is None:
        raise ConfigError("%s.name: missing" % where)
    if len(name) < 2 or len(name) > 128 or not NAME_RE.match(name):
        raise ConfigError(
            "%s.name: %r must be 2-128 characters of a-z 0-9, separated by single "
            "'.', '_' or '-' (it becomes a container name and an image repository)"
            % (where, name))
    for arg in fields.get("args", ()):
        if arg.split("=", 1)[0] in FORBIDDEN_ARGS:
            raise ConfigError("%s.args: %r is set by edd itself" % (where, arg))
    for key in ("args", "command", "release_command"):
        if key in fields:
            fields[key] = tuple(fields[key])
    if "clients" in fields:
        fields["clients"] = frozenset(fields["clients"])
    return Deployment(**fields)


def parse_config(raw, path):
    """Turn the decoded JSON `raw` into a Config; relative paths are from `path`'s folder."""
    fields = _take(raw, TOP_KEYS, "")
    if "deployments" not in fields:
        raise ConfigError("deployments: missing")
    deployments = {}
    for index, item in enumerate(fields.pop("deployments")):
        deployment = _parse_deployment(item, "deployments[%d]" % index)
        if deployment.name in deployments:
            raise ConfigError("deployments[%d].name: %r appears twice"
                              % (index, deployment.name))
        deployments[deployment.name] = deployment
    if "listen" in fields:
        fields["listen"] = _parse_listen(fields["listen"])
    for key in ("admins", "metrics_clients"):
        if key in fields:
            fields[key] = frozenset(fields[key])
    config = Config(path=path, deployments=deployments, **fields)
    base = os.path.dirname(os.path.abspath(path))
    files = {key: os.path.join(base, getattr(config, key))
             for key in ("server_cert", "server_key", "client_ca")}
    for key, file in files.items():
        if not os.access(file, os.R_OK):
            raise ConfigError("%s: cannot read %s" % (key, file))
    return dataclasses.replace(config, state_dir=os.path.join(base, config.state_dir),
                               **files)


def load_config(path):
    """Read and validate the config file; raise ConfigError naming the file and key."""
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except OSError as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise ConfigError("%s: not valid JSON: %s" % (path, exc)) from None
    try:
        return parse_config(raw, path)
    except ConfigError as exc:
        raise ConfigError("%s: %s" % (path, exc)) from None


# TLS 1.2 suites with forward secrecy and an AEAD; TLS 1.3's are all of that kind.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def tls_context(protocol, cert, key, ca, cert_names, ca_name):
    """A TLS 1.2+ context that presents `cert`/`key` and trusts only `ca` (None:
    the system's CAs). Server and client share it; ConfigError names the files by
    `cert_names` and `ca_name`, the config keys or command-line options."""
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("%s: cannot load %s with %s: %s"
                          % (cert_names, cert, key or cert, exc)) from None
    try:
        if ca is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("%s: cannot load %s: %s" % (ca_name, ca, exc)) from None
    return context


def make_ssl_context(config):
    """The server's TLS context: TLS 1.2+, client certificates required from client_ca.

    No session resumption: a resumed session skips the certificate check, so a
    certificate that expired (or a client_ca that was replaced) would go on working.
    """
    try:
        context = tls_context(ssl.PROTOCOL_TLS_SERVER, config.server_cert, config.server_key,
                              config.client_ca, "server_cert/server_key", "client_ca")
    except ConfigError as exc:
        raise ConfigError("%s: %s" % (config.path, exc)) from None
    context.options |= ssl.OP_NO_TICKET
    if hasattr(context, "num_tickets"):
        context.num_tickets = 0             # TLS 1.3 tickets (OpenSSL 1.1.1+)
    # A read side shut down under TLS (SIGTERM aborting an upload) must still let
    # edd send its answer; OpenSSL 3 otherwise makes that EOF fatal. HTTP framing
    # still notices a body that was cut short.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 1 << 7)
    return context


def tls_fingerprint(config):
    """A digest of the TLS files' contents: a reload that changes them changes it."""
    digest = hashlib.sha256()
    for path in (config.client_ca, config.server_cert, config.server_key):
        try:
            with open(path, "rb") as file:
                digest.update(hashlib.sha256(file.read()).digest())
        except OSError as exc:
            raise ConfigError("%s: cannot read %s: %s" % (config.path, path, exc.strerror))
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Docker: the only place that runs the CLI
# ---------------------------------------------------------------------------

def _docker_message(stderr):
    text = stderr.decode("utf-8", "replace").strip()
    return text.replace("Error response from daemon: ", "") or "docker failed"


# How each engine says a container or image is not there: docker "No such
# container: X", "No such image: X"; podman 4.x "no such container X",
# "X: image not known", and for `rm` "no container with name or ID "X" found".
MISSING_RE = re.compile(r"no such \w+:? \"?([^\s\"]+)|([^\s:\"]+(?::[^\s:\"]+)?): image not known",
                        re.IGNORECASE)


def _is_missing(message):
    lowered = message.lower()
    return any(words in lowered for words in ("no such", "not known", "no container with"))


def _missing_names(message):
    return {(a or b).rstrip(":") for a, b in MISSING_RE.findall(message)}


@dataclasses.dataclass(frozen=True)
class Engine:
    """What the `docker` CLI in the config really drives, learned from the CLI itself.

    kind is "docker" or "podman" (a podman-docker shim counts as podman);
    image_store is "classic" (docker's graph drivers), "containerd" (docker's
    containerd image store, the default of fresh Docker 29 installs) or "podman".
    """
    kind: str
    version: str = None             # the engine's own (server) version; None: not answering
    image_store: str = None
    rootless: bool = False

    @property
    def thin_layouts(self):
        """The archive layouts ("legacy", "oci") that `load` accepts without the
        layers the engine already has; () when it takes no such archive.

        docker classic opens a layer file only for a layer it lacks (moby
        image/tarexport/load.go, PR #18727); the containerd store imports the
        archive as an OCI index and wants every blob its manifests name unless the
        content store has it, which only the OCI layout's digests let it look up
        (a legacy archive without a layer fails with `layer ... not found`);
        podman copies the archive through containers/image, which reads every
        layer the manifest names (podman#8132)."""
        return {"classic": ("legacy", "oci"), "containerd": ("oci",)}.get(self.image_store, ())

    @property
    def runs_healthchecks(self):
        """podman runs HEALTHCHECKs from systemd timers: with no systemd to reach
        (containers, minimal VMs) a health status stays "starting" for ever."""
        return self.kind != "podman"

    def summary(self):
        return {"name": self.kind, "version": self.version, "image_store": self.image_store,
                "rootless": self.rootless}

    def __str__(self):
        return "%s %s (image store: %s%s)" % (self.kind, self.version or "(not answering)",
                                               self.image_store or "unknown",
                                               ", rootless" if self.rootless else "")


def engine_from_info(kind, info):
    """The Engine described by `info --format '{{json .}}'` of a docker or podman CLI."""
    if kind == "podman":
        return Engine("podman", (info.get("version") or {}).get("Version"), "podman",
                      bool(((info.get("host") or {}).get("security") or {}).get("rootless")))
    # Docker 24+ on the containerd store reports the snapshotter in DriverStatus:
    # [["driver-type", "io.containerd.snapshotter.v1"]].
    driver_status = json.dumps(info.get("DriverStatus") or [])
    store = "containerd" if "io.containerd.snapshotter.v1" in driver_status else "classic"
    rootless = any("rootless" in option for option in info.get("SecurityOptions") or ())
    return Engine("docker", info.get("ServerVersion"), store, rootless)


def _normalize_id(value):
    """podman prints ids as bare hex; docker as sha256:hex. edd speaks docker's form."""
    if isinstance(value, str) and re.match(r"[0-9a-f]{64}\Z", value):
        return "sha256:" + value
    return value


def run_state(container):
    """'running', 'paused' or 'stopped': the states a swap puts a container back in."""
    state = (container or {}).get("State") or {}
    if state.get("Paused"):
        return "paused"
    if state.get("Running") or state.get("Restarting"):
        return "running"
    return "stopped"


class Docker:
    """Runs `docker` with argv lists, never a shell; failures raise DockerError.

    The CLI may be podman's: every difference between the engines is handled
    here, so the deploy logic sees docker's JSON and docker's words.
    """

    def __init__(self, command="docker"):
        self.command = command
        self.engine = Engine("docker")
        self._health_runs = {}      # container id -> when edd last ran its HEALTHCHECK

    def _call(self, args, timeout, stderr=subprocess.PIPE):
        """Run docker with `args` to the end; return the CompletedProcess (bytes)."""
        argv = [self.command] + list(args)
        log.debug("docker: %s", " ".join(argv))
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=stderr, timeout=timeout)
        except OSError as exc:
            raise DockerError("cannot run the docker CLI %s: %s"
                              % (self.command, exc.strerror or exc)) from None
        except subprocess.TimeoutExpired:
            raise DockerError("docker %s took longer than %d s" % (args[0], timeout)) from None

    def run(self, *args, timeout=300):
        """Run docker with `args`; return its stdout (text). Raise DockerError on failure."""
        done = self._call(args, timeout)
        if done.returncode != 0:
            raise DockerError(_docker_message(done.stderr))
        return done.stdout.decode("utf-8", "replace")

    def detect(self, timeout=20):
        """Learn which engine the CLI drives (`--version`, then `info`); return the Engine.

        `--version` needs no daemon, so the kind is known even when the engine
        is down; version and image store then stay None and DockerError is raised."""
        self.engine = Engine("podman" if self.run("--version", timeout=timeout)
                             .lower().startswith("podman") else "docker")
        text = self.run("info", "--format", "{{json .}}", timeout=timeout)
        try:
            info = json.loads(text)
        except ValueError:
            raise DockerError("`%s info` printed no JSON: %s"
                              % (self.command, text.strip()[:200])) from None
        self.engine = engine_from_info(self.engine.kind, info)
        return self.engine

    def inspect(self, kind, names):
        """{name: docker's JSON} for the containers or images that exist among `names`."""
        if not names:
            return {}
        done = self._call([kind, "inspect"] + list(names), timeout=60)
        message = _docker_message(done.stderr)
        if done.returncode != 0 and not _is_missing(message):
            raise DockerError(message)
        found = [self._normalize(kind, obj) for obj in json.loads(done.stdout or b"[]")]
        # docker keeps the order of the names it found, skipping the missing ones.
        missing = _missing_names(message)
        present = [n for n in names if n not in missing]
        if len(present) != len(found):
            present = [(obj.get("Name") or "").lstrip("/") or obj.get("Id") for obj in found]
        if kind == "container":
            # docker reads a name that matches no container as an ID prefix: a
            # deployment called `cafe` must not find container cafe3b1f….
            return {name: obj for name, obj in zip(present, found)
                    if name in ((obj.get("Name") or "").lstrip("/"), obj.get("Id"))}
        return dict(zip(present, found))

    def _normalize(self, kind, obj):
        """docker's form of podman's JSON: sha256: image ids, names without '/', no
        empty Health. (Container ids are bare hex on both engines.)"""
        key = "Id" if kind == "image" else "Image"
        if key in obj:
            obj[key] = _normalize_id(obj[key])
        if "Name" in obj:
            obj["Name"] = (obj["Name"] or "").lstrip("/")
        state = obj.get("State")
        if isinstance(state, dict) and not (state.get("Health") or {}).get("Status"):
            state["Health"] = None      # podman 4: {"Status": ""}; podman 5: null
        config = obj.get("Config")
        if self.engine.kind == "podman" and isinstance(config, dict) and \
                str(config.get("Image")).startswith("localhost/"):
            # podman qualifies a local name: edd/web:current is localhost/edd/web:current.
            config["Image"] = config["Image"][len("localhost/"):]
        return obj

    def container(self, name):
        return self.inspect("container", [name]).get(name)

    def image_id(self, ref):
        image = self.inspect("image", [ref]).get(ref)
        return image["Id"] if image else None

    def image_ids(self):
        """The IDs of every image on the host, intermediate ones too."""
        for attempt in range(3):
            try:
                return set(self.run("images", "--all", "--quiet", "--no-trunc",
                                    timeout=60).split())
            except DockerError as exc:
                # podman lists in two passes: an image removed in between fails
                # the whole listing ("image not known"); the next look is whole.
                if attempt == 2 or not _is_missing(str(exc)):
                    raise

    def run_quietly(self, *args):
        """Run a clean-up command whose failure is only worth a log line."""
        try:
            self.run(*args)
            return True
        except DockerError as exc:
            level = logging.DEBUG if _is_missing(str(exc)) else logging.WARNING
            log.log(level, "docker %s: %s", " ".join(args), exc)
            return False

    def logs(self, name, tail, timeout=DOCKER_TIMEOUT):
        """The container's last `tail` lines of output, stdout and stderr merged."""
        done = self._call(["logs", "--tail", str(tail), name], timeout=timeout,
                          stderr=subprocess.STDOUT)
        return done.stdout.decode("utf-8", "replace")

    def run_due_healthcheck(self, container):
        """Run the container's HEALTHCHECK once if the engine does not and one
        interval has passed since edd last did (the first after one interval, as
        docker does). The outcome shows in the next inspect."""
        if self.engine.runs_healthchecks:
            return
        interval = ((container.get("Config") or {}).get("Healthcheck") or {}).get("Interval")
        seconds = (interval or 30e9) / 1e9
        now = time.monotonic()
        last = self._health_runs.setdefault(container["Id"], now)
        if now - last >= seconds:
            self._health_runs[container["Id"]] = now
            self._call(["healthcheck", "run", container["Id"]], timeout=max(seconds, 30))

    def stream(self, args, timeout=300, size=1 << 16):
        """Run docker with `args`; yield its output (stderr merged) `size` bytes at a time.

        Closing the generator early kills docker, as does `timeout`: the output of
        `docker logs` goes to the client as it comes, never whole into memory.
        """
        process = self._popen(args, subprocess.DEVNULL)
        return self._output(process, WATCHER.call_later(timeout, process.kill), size)

    def swap_containers(self, name, token):
        """The IDs of the containers labelled as deployment `name`'s, created by the
        swap `token`."""
        return self.run("ps", "-a", "-q", "--no-trunc",
                        "--filter", "label=%s=%s" % (LABEL, name),
                        "--filter", "label=%s=%s" % (SWAP_LABEL, token),
                        timeout=DOCKER_TIMEOUT).split()

    def stop(self, container_id, seconds):
        """Stop the container, whatever the CLI says: a `docker stop` that fails or
        times out may leave the daemon stopping it still, so on failure edd watches
        the container until it has stopped (DockerError if it never does)."""
        limit = seconds + STOP_MARGIN_SECONDS
        try:
            self.run("stop", "-t", str(seconds), container_id, timeout=limit)
            return
        except DockerError as exc:
            error = exc
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                container = self.container(container_id)
            except DockerError:
                container = {"State": {"Running": True}}      # not known to have stopped
            if container is None or run_state(container) == "stopped":
                log.warning("docker stop %s: %s; but the container stopped", container_id, error)
                return
            time.sleep(POLL_SECONDS)
        raise error

    def _popen(self, args, stdin, stderr=subprocess.STDOUT):
        """Start docker with `args`, its stdout a pipe (stderr merged into it unless
        `stderr` says otherwise)."""
        argv = [self.command] + list(args)
        log.debug("docker: %s", " ".join(argv))
        try:
            return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=stderr, bufsize=0)
        except OSError as exc:
            raise DockerError("cannot run the docker CLI %s: %s"
                              % (self.command, exc.strerror or exc)) from None

    @staticmethod
    def _output(process, timer, size):
        try:
            while True:
                piece = process.stdout.read(size)
                if not piece:
                    return
                yield piece
        finally:
            WATCHER.cancel(timer)
            process.kill()
            process.stdout.close()
            process.wait()

    def run_attached(self, args, timeout, tail_lines):
        """Run docker with `args` in the foreground (`docker run` without -d), keeping only
        the last `tail_lines` lines of its output; return (exit status, output text).

        The status is None when it ran past `timeout` seconds: the CLI is then killed,
        but whatever it started in the daemon goes on; the caller must look and clean up.
        """
        process = self._popen(args, subprocess.DEVNULL)
        lines = collections.deque(maxlen=tail_lines)

        def read():
            for line in iter(lambda: process.stdout.readline(RELEASE_LINE_BYTES), b""):
                lines.append(line)
        reader = threading.Thread(target=read, name="docker-run-output", daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(10)
            process.stdout.close()
        return returncode, b"".join(lines).decode("utf-8", "replace")


    def start_load(self):
        """Start `docker load` reading stdin; its output (stderr merged) is drained by a thread.

        podman's `load` first copies all of stdin to a file in its image_copy_tmp_dir
        (/var/tmp unless containers.conf or TMPDIR say otherwise) and loads from
        there: a push to podman needs the archive's size free there, on top of
        the unpacked layers in its storage."""
        process = self._popen(["load"], subprocess.PIPE)
        _widen_pipe(process.stdin)
        return process, _drain(process.stdout, "docker-load-output")

    def loaded_refs(self, output):
        """The images a finished `load` printed, as names this engine resolves."""
        refs = parse_load_output(output)
        if self.engine.kind == "podman":
            # podman qualifies names (localhost/website:latest) and prints an
            # archive without names as its bare id (sha256:HEX, as docker does).
            refs = [ref[len("localhost/"):] if ref.startswith("localhost/") else ref
                    for ref in refs]
        return refs

    def start_save(self, ref):
        """Start `docker save ref`, the archive on its stdout; its stderr is drained by a
        thread. Return (process, finish): finish() gives stderr once stdout is read."""
        process = self._popen(["save", ref], subprocess.DEVNULL, stderr=subprocess.PIPE)
        _widen_pipe(process.stdout)
        return process, _drain(process.stderr, "docker-save-errors")


def _widen_pipe(pipe):
    """Ask the kernel for a PIPE_SIZE pipe: fewer, larger reads and writes."""
    try:
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass    # a smaller pipe only costs a few more context switches


def _drain(stream, name):
    """Read `stream` to its end in a thread, so the child never blocks on a full pipe;
    return a function that waits for that and gives what was read (text)."""
    output = []
    reader = threading.Thread(target=lambda: output.append(stream.read()), name=name,
                              daemon=True)
    reader.start()

    def finish():
        reader.join()
        return output[0].decode("utf-8", "replace") if output else ""
    return finish

def parse_load_output(text):
    """The image references `docker load` printed: 'repo:tag' names or 'sha256:…' ids."""
    refs = []
    for line in text.splitlines():
        match = re.match(r"\s*Loaded image(?: ID)?: (\S+)\s*$", line)
        if match and match.group(1) not in refs:
            refs.append(match.group(1))
    return refs


def load_failure(returncode, output):
    """What went wrong with a finished `load`, or None if it loaded.

    Docker 27.2+ on the containerd store prints "Error unpacking image ..." and
    still exits 0 when it imported an image but could not unpack it (moby
    daemon/containerd/image_exporter.go): the image cannot run, so that is a
    failed load too."""
    unpacking = [line for line in output.splitlines() if "Error unpacking image" in line]
    if returncode == 0 and not unpacking:
        return None
    message = "\n".join(unpacking) or output.strip()
    # podman lists what each of its format readers said, with the names of its
    # temporary files; for a `docker save` upload the docker-archive one counts.
    reader = re.search(r"^\s*\* docker-archive: (.*)$", message, re.MULTILINE)
    if reader and "does not match any of the supported image formats" in message:
        message = "not an image archive (docker-archive: %s)" % reader.group(1)
    return message.replace("Error response from daemon: ", "") or "exit %d" % returncode


# ---------------------------------------------------------------------------
# Archives: reading and filtering docker save / OCI tar streams
# ---------------------------------------------------------------------------
#
# `docker save` writes a tar: layer tars, image configs, and the small metadata
# files that name the images (manifest.json, repositories, and for the OCI
# layout index.json). `docker load` applies those names to the host and takes
# any layer it already has from the host instead of from the archive. So edd
# reads the archive on its way to `docker load`, with a tar header walker of
# its own that passes member bytes through untouched: it records every member
# and the sha256 of its bytes, holds the metadata files back, and writes them
# at the end with every image name removed. The same filter, given a `drop`
# set, leaves chosen members out, which is what a client that skips layers the
# host already has needs. The walker reads headers the way Go's archive/tar
# (which `docker load` uses) does, and refuses what it cannot read the same way.

TAR_BLOCK = 512
METADATA_FILES = ("manifest.json", "repositories", "index.json")
MAX_METADATA_BYTES = 4 << 20        # docker's own are a few KiB
MAX_SPECIAL_BYTES = 1 << 20         # a pax or GNU long-name header; Go's limit too
MAX_MEMBERS = 1 << 14              # docker save writes about four per layer
OUTPUT_MERGE = 1 << 16              # smaller pieces are joined before they are written
# Annotations that name an image in index.json (containerd and OCI).
NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
GZIP_MAGIC = b"\x1f\x8b"
REGULAR_TYPES = (b"0", b"\0", b"7")
LINK_TYPES = (b"1", b"2")           # hard link, symbolic link
HEADER_ONLY_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")   # no data, whatever size says


@dataclasses.dataclass
class Member:
    """One member of an archive: `offset` is where its data starts in the tar stream;
    `sha256` is "sha256:…" of its bytes, and `digests` holds that and, for bytes
    that are gzip, the digest of them gunzipped (regular files that passed only)."""
    name: str
    type: bytes
    size: int
    offset: int
    linkname: str = ""
    sha256: str = None
    digests: frozenset = frozenset()


@dataclasses.dataclass
class Archive:
    """What the filter saw: every member by (normalized) name, and the metadata files
    as the archive had them (before any name was removed)."""
    members: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)

    def digests(self):
        """Every "sha256:…" that some member's bytes hash to."""
        return frozenset(d for member in self.members.values() for d in member.digests)


def member_name(raw):
    """A tar member name as `docker load` will write it: cleaned, relative to the root."""
    # Go's filepath.Clean, then joined below the root: "/a" lands at "a", and
    # "../a" stays outside (docker refuses it, and so does the filter).
    return posixpath.normpath(raw or ".").lstrip("/") or "."


def _tar_number(field):
    if field[:1] and field[0] & 0x80:               # GNU base-256
        if field[0] == 0xff:
            raise BadRequest("the archive has a tar header with a negative number")
        return int.from_bytes(bytes([field[0] & 0x7f]) + field[1:], "big")
    # Go's parseOctal: trim spaces and NULs at both ends, then stop at a NUL.
    text = field.strip(b" \0").split(b"\0", 1)[0]
    if not re.match(rb"[0-7]*\Z", text):
        raise BadRequest("the archive has a tar header with a malformed number")
    return int(text or b"0", 8)


def _tar_string(field):
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block):
    try:
        stored = _tar_number(block[148:156])
    except BadRequest:
        return False
    rest = block[:148] + b" " * 8 + block[156:]
    return stored in (sum(rest), sum(b - 256 if b > 127 else b for b in rest))


def _parse_pax(data):
    """The records of a pax extended header ("LEN key=value\\n" each)."""
    records = {}
    while data:
        length, _, rest = data.partition(b" ")
        if not length.isdigit() or int(length) > len(data) or int(length) < len(length) + 3:
            raise BadRequest("the archive has a malformed pax header")
        record, data = data[:int(length)], data[int(length):]
        key, sep, value = record[len(length) + 1:-1].partition(b"=")
        if not sep or record[-1:] != b"\n":
            raise BadRequest("the archive has a malformed pax header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                       "surrogateescape")
    return records


def tar_member(name, data):
    """A regular file member (ustar header, data, padding) holding `data`."""
    header = bytearray(TAR_BLOCK)
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError("name too long for a ustar header: %r" % name)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000644\0"
    header[108:116] = header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"%011o\0" % 0
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % TAR_BLOCK)


def _json(archive, name):
    try:
        return json.loads(archive.metadata[name].decode("utf-8"))
    except ValueError:
        raise BadRequest("the archive's %s is not valid JSON" % name) from None


def strip_names(name, raw):
    """The metadata file `name` rewritten with every image name removed (and the
    Parent links of manifest.json, which would tie loaded images to others)."""
    value = json.loads(raw.decode("utf-8"))
    if name == "manifest.json":
        for entry in value if isinstance(value, list) else ():
            if isinstance(entry, dict):
                entry.pop("RepoTags", None)
                entry.pop("Parent", None)
    elif name == "repositories":
        value = {}
    elif name == "index.json" and isinstance(value, dict):
        for descriptor in [value] + list(value.get("manifests") or []):
            annotations = descriptor.get("annotations") if isinstance(descriptor, dict) else None
            if isinstance(annotations, dict):
                for key in NAME_ANNOTATIONS:
                    annotations.pop(key, None)
    return json.dumps(value, separators=(",", ":")).encode()


class _Digest:
    """sha256 of a member's bytes, and of them gunzipped when they start as gzip does
    (containerd's archives keep layers compressed; docker's diff IDs are of the tar)."""

    def __init__(self):
        self.raw = hashlib.sha256()
        self.gunzipped = None
        self.first = bytearray()        # the first bytes, until there are two to look at

    def update(self, piece):
        self.raw.update(piece)
        if self.first is not None:
            self.first += piece
            if len(self.first) < 2:
                return
            piece, self.first = self.first, None
            if piece[:2] == GZIP_MAGIC:
                self.gunzipped = (hashlib.sha256(), zlib.decompressobj(16 + zlib.MAX_WBITS))
        if self.gunzipped:
            try:
                self.gunzipped[0].update(self.gunzipped[1].decompress(piece))
            except zlib.error:
                self.gunzipped = None

    def finish(self, member):
        member.sha256 = "sha256:" + self.raw.hexdigest()
        found = {member.sha256}
        if self.gunzipped and self.gunzipped[1].eof:
            found.add("sha256:" + self.gunzipped[0].hexdigest())
        member.digests = frozenset(found)


class ArchiveFilter:
    """A streaming filter of one tar archive (docker save, legacy or OCI layout).

    feed(data) takes the next bytes of the archive and returns the pieces to pass
    on (memoryviews into `data`, or bytes); close() returns the last pieces: the
    held metadata files, rewritten without image names if `strip` is set, and
    the end-of-archive marker. Members named in `drop` are left out. As it goes
    it fills `archive` (an Archive): members, their digests, the metadata files
    as sent. Anything it cannot read as Go's archive/tar would raises BadRequest.
    """

    def __init__(self, archive, drop=frozenset(), strip=True):
        self.archive = archive
        self.drop = frozenset(drop)
        self.strip = strip
        self.offset = 0                 # bytes of the archive read so far
        self._block = bytearray()       # a header block being assembled
        self._held = bytearray()        # pax / GNU long-name headers of the next member
        self._extended = {}             # their meaning: path, linkpath, size
        self._left = 0                  # data bytes of the current member still to come
        self._pad = 0                   # and padding after them
        self._mode = None               # "pass", "drop", "capture" or "extended"
        self._member = None
        self._data = None               # captured bytes (metadata, extended headers)
        self._digest = None
        self._symlinks = set()
        self._ended = False
        self._started = False

    def feed(self, data):
        view = memoryview(data).cast("B")
        out = []
        pos = 0
        while pos < len(view) and not self._ended:
            self._started = True
            if self._left or self._pad:
                count = min(self._left + self._pad, len(view) - pos)
                self.offset += count
                self._take(view[pos:pos + count], out)
            else:
                count = min(TAR_BLOCK - len(self._block), len(view) - pos)
                self._block += view[pos:pos + count]
                self.offset += count
                if len(self._block) == TAR_BLOCK:
                    self._header(bytes(self._block), out)
                    self._block.clear()
            pos += count
        # Bytes after the end-of-archive marker are not passed on: docker's
        # reader would stop there too, or fail.
        return _merge(out)

    def close(self):
        """The pieces that end the archive; BadRequest if it was cut short."""
        if not self._started:
            raise BadRequest("the upload is empty; send the output of `docker save`")
        if self._block or self._left or self._pad or self._held:
            raise BadRequest("the archive is cut short")
        out = []
        for name, raw in self.archive.metadata.items():
            try:
                text = strip_names(name, raw) if self.strip else raw
            except ValueError:
                raise BadRequest("the archive's %s is not valid JSON" % name) from None
            out.append(tar_member(name, text))
        out.append(b"\0" * (2 * TAR_BLOCK))
        return out

    def _take(self, piece, out):
        data = piece[:self._left]
        if self._mode in ("capture", "extended"):
            self._data += data
        elif self._digest:
            self._digest.update(data)
        if self._mode == "pass":
            out.append(piece)
        elif self._mode == "extended":
            self._held += piece
        self._pad -= len(piece) - len(data)
        self._left -= len(data)
        if not self._left and not self._pad:
            self._end_member()

    def _end_member(self):
        member, data = self._member, self._data
        if self._mode == "extended":
            self._extended = self._extended_meaning(member.type, bytes(data))
        elif self._mode == "capture":
            self.archive.metadata[member.name] = bytes(data)
            member.sha256 = "sha256:" + hashlib.sha256(data).hexdigest()
        elif self._digest:
            self._digest.finish(member)
        self._mode = self._member = self._data = self._digest = None

    def _extended_meaning(self, kind, data):
        """The extended headers so far, with this one's meaning: as in Go, a later
        header of a kind replaces an earlier one, and a GNU long name beats a pax path."""
        meaning = dict(self._extended)
        if kind in (b"L", b"K"):
            meaning["gnu " + ("path" if kind == b"L" else "linkpath")] = _tar_string(data)
            return meaning
        records = _parse_pax(data)
        if any(key.startswith("GNU.sparse.") for key in records):
            raise BadRequest("the archive holds a sparse file; docker save writes none")
        if any("\0" in records.get(key, "") for key in ("path", "linkpath")):
            raise BadRequest("the archive has a pax path with a NUL in it")
        meaning = {k: v for k, v in meaning.items() if k.startswith("gnu ")}
        meaning.update(("pax " + key, records[key]) for key in ("path", "linkpath", "size")
                       if key in records)
        return meaning

    def _header(self, block, out):
        if block == bytes(TAR_BLOCK):
            if self._held:
                raise BadRequest("the archive ends inside a member's extended header")
            self._ended = True
            return
        if not _checksum_ok(block):
            raise BadRequest("not a tar archive (a bad header at byte %d); send the output "
                             "of `docker save`, plain or gzip'd" % (self.offset - TAR_BLOCK))
        kind = block[156:157]
        size = _tar_number(block[124:136])
        if kind in (b"x", b"L", b"K"):
            if size > MAX_SPECIAL_BYTES:
                raise BadRequest("the archive has an extended tar header over 1 MiB")
            self._held += block
            self._start(Member("", kind, size, self.offset), "extended", size)
            return
        if kind == b"S":
            raise BadRequest("the archive holds a sparse file; docker save writes none")
        if kind == b"g":
            if self._held:
                raise BadRequest("the archive has a global pax header inside a member")
            out.append(block)
            self._start(Member("", kind, size, self.offset), "pass", size)
            return
        member = self._member_from(block, kind, size)
        mode = self._mode_for(member)
        if mode == "pass":
            out.append(bytes(self._held) + block)
        self._held.clear()
        self._extended = {}
        self._start(member, mode, 0 if member.type in HEADER_ONLY_TYPES else member.size)

    def _member_from(self, block, kind, size):
        name = _tar_string(block[0:100])
        if block[257:263] == b"ustar\0":
            # POSIX ustar keeps a name prefix; star's is shorter, GNU has none.
            prefix = block[345:476] if block[508:512] == b"tar\0" else block[345:500]
            if _tar_string(prefix):
                name = _tar_string(prefix) + "/" + name
        extended = self._extended
        name = extended.get("gnu path", extended.get("pax path", name))
        linkname = extended.get("gnu linkpath", extended.get("pax linkpath",
                                                             _tar_string(block[157:257])))
        if "pax size" in extended:
            if not re.match(r"[0-9]{1,20}\Z", extended["pax size"]):
                raise BadRequest("the archive has a malformed pax size")
            size = int(extended["pax size"])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"
        return Member(member_name(name), kind, size, self.offset, linkname)

    def _mode_for(self, member):
        """How the filter treats a member, once its name is checked."""
        name = member.name
        if name == ".." or name.startswith("../"):
            raise BadRequest("the archive has a member outside its root: %r" % name)
        parents = name.split("/")[:-1]
        if any("/".join(parents[:i + 1]) in self._symlinks for i in range(len(parents))):
            raise BadRequest("the archive writes %r through a symbolic link" % name)
        if member.type == b"2":
            self._symlinks.add(name)
        if len(self.archive.members) >= MAX_MEMBERS and name not in self.archive.members:
            raise BadRequest("the archive has more than %d members" % MAX_MEMBERS)
        self.archive.members[name] = member
        if name in METADATA_FILES:
            if member.type not in REGULAR_TYPES or name in self.archive.metadata:
                raise BadRequest("the archive's %s must be one regular file" % name)
            if member.size > MAX_METADATA_BYTES:
                raise BadRequest("the archive's %s is larger than %d MiB"
                                 % (name, MAX_METADATA_BYTES >> 20))
            self.archive.metadata[name] = b""
            return "capture"
        return "drop" if name in self.drop else "pass"

    def _start(self, member, mode, size):
        self._member, self._mode = member, mode
        self._left, self._pad = size, -size % TAR_BLOCK
        if mode in ("capture", "extended"):
            self._data = bytearray()
        elif mode == "pass" and member.type in REGULAR_TYPES:
            self._digest = _Digest()
        if not size:
            self._end_member()


def _merge(pieces):
    """Join runs of small pieces, so that small members cost few writes."""
    merged, small = [], []
    for piece in pieces:
        if len(piece) >= OUTPUT_MERGE:
            if small:
                merged.append(b"".join(small))
                small = []
            merged.append(piece)
        else:
            small.append(piece)
    if small:
        merged.append(b"".join(small))
    return merged


def filter_archive(chunks, archive, drop=frozenset(), strip=True):
    """Yield the tar stream `chunks` through an ArchiveFilter (see there) to the end."""
    tar = ArchiveFilter(archive, drop, strip)
    for chunk in chunks:
        yield from tar.feed(chunk)
    yield from tar.close()


def gunzip_chunks(chunks):
    """Yield `chunks` decompressed if they are gzip (one or more members), else as they are."""
    chunks = iter(chunks)
    first = b""
    for chunk in chunks:
        first += bytes(chunk)
        if len(first) >= 2:
            break
    if first[:2] != GZIP_MAGIC:
        if first:
            yield first
        yield from chunks
        return
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for chunk in itertools.chain([first], chunks):
        while chunk:
            try:
                out = inflater.decompress(chunk, BUFFER_SIZE)
            except zlib.error as exc:
                raise BadRequest("the gzip'd upload is corrupt: %s" % exc) from None
            if out:
                yield out
            if inflater.eof:                # a next gzip member may follow
                chunk = inflater.unused_data
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if chunk else inflater
            else:
                chunk = inflater.unconsumed_tail
    if not inflater.eof:
        raise BadRequest("the gzip'd upload is cut short")


def read_manifest(archive):
    """manifest.json's entries, checked: [{"Config": str, "Layers": [str], "RepoTags": [str]}]."""
    if "manifest.json" not in archive.metadata:
        raise BadRequest("the archive has no manifest.json; send the output of `docker save`")
    entries = _json(archive, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise BadRequest("the archive's manifest.json lists no image")
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("Config"), str) and
                _strings(entry.get("Layers")) and _strings(entry.get("RepoTags") or [])):
            raise BadRequest("the archive's manifest.json has a malformed entry")
    return entries


def _strings(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def archive_names(archive):
    """Every image name the archive carries: RepoTags, repositories, index.json's names."""
    names = []
    if "manifest.json" in archive.metadata:
        names += [tag for entry in read_manifest(archive) for tag in entry.get("RepoTags") or []]
    if "repositories" in archive.metadata:
        repositories = _json(archive, "repositories")
        for repo, tags in (repositories.items() if isinstance(repositories, dict) else ()):
            names += ["%s:%s" % (repo, tag) for tag in (tags if isinstance(tags, dict) else ())]
    if "index.json" in archive.metadata:
        index = _json(archive, "index.json")
        for descriptor in (index.get("manifests") or []) if isinstance(index, dict) else ():
            annotations = descriptor.get("annotations") if isinstance(descriptor, dict) else None
            if isinstance(annotations, dict) and \
                    isinstance(annotations.get(NAME_ANNOTATIONS[0]), str):
                names.append(annotations[NAME_ANNOTATIONS[0]])
    return list(dict.fromkeys(names))


def resolve_member(archive, name):
    """The regular member that `name` leads to through links, or None."""
    name = member_name(name)
    for _ in range(16):
        member = archive.members.get(name)
        if member is None or member.type not in LINK_TYPES:
            return member
        base = posixpath.dirname(name) if member.type == b"2" else ""
        name = member_name(posixpath.join(base, member.linkname))
    return None


def config_id(archive, entry):
    """The image ID ("sha256:…") of a manifest entry: the digest of its config."""
    member = resolve_member(archive, entry["Config"])
    if member is None or member.sha256 is None:
        raise BadRequest("the archive lacks the config %s" % entry["Config"])
    return member.sha256


def read_member(file, member):
    """The data of `member` of the archive spooled in `file` (a seekable binary file)."""
    file.seek(member.offset)
    return file.read(member.size)


def layer_diff_ids(entry, config):
    """[(Layers[i], diff_ids[i])] of a manifest entry, given its config's bytes: the one
    mapping from archive paths to layers (file names prove nothing: containerd names
    layer blobs by their compressed digest)."""
    try:
        diff_ids = json.loads(config.decode("utf-8"))["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise BadRequest("the image config %s has no rootfs.diff_ids" % entry["Config"]) from None
    if not _strings(diff_ids) or len(diff_ids) != len(entry["Layers"]):
        raise BadRequest("the image config %s does not match its manifest entry"
                         % entry["Config"])
    return list(zip(entry["Layers"], diff_ids))


# ---------------------------------------------------------------------------
# State dir: swap records and locks
# ---------------------------------------------------------------------------

# A swap's record says what it is changing and how far it got, kept in state_dir
# until the swap is finished or undone. Container labels cannot change once a
# container exists, so the phase of a swap has to live in a file; state_dir
# survives a reboot, and the lock beside the record keeps a second edd process
# (sharing state_dir) off a deployment that this one holds.

def _record_path(state_dir, name):
    return os.path.join(state_dir, name + ".swap")


def read_record(state_dir, name):
    """The deployment's unfinished swap (a dict), or None when there is none."""
    path = _record_path(state_dir, name)
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EddError("cannot read the swap record %s: %s" % (path, exc)) from None


def write_record(state_dir, name, record):
    """Replace the record atomically and durably: it must outlive a crash or power cut."""
    path = _record_path(state_dir, name)
    with open(path + ".new", "w", encoding="utf-8") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".new", path)
    _sync_dir(state_dir)


def remove_record(state_dir, name):
    try:
        os.unlink(_record_path(state_dir, name))
    except FileNotFoundError:
        return
    _sync_dir(state_dir)


def _sync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_deployment(state_dir, name):
    """Take the deployment's lock file in `state_dir` and return its descriptor (closing
    it releases the lock); Conflict when another process holds it."""
    path = os.path.join(state_dir, name + ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise EddError("cannot open the lock %s: %s" % (path, exc.strerror)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise Conflict("deployment %r is busy in another edd process (it holds %s)"
                       % (name, path)) from None
    return fd


# ---------------------------------------------------------------------------
# Deploy logic: load, swap behind a health gate, restore
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Loaded:
    image_id: str
    images: list            # the names the archive gave its images, or their IDs
    bytes: int


def _write_all(fd, view):
    while view:
        view = view[os.write(fd, view):]


def _counted(chunks, counter):
    for chunk in chunks:
        counter[0] += len(chunk)
        yield chunk


def load_archive(docker, chunks):
    """Stream the upload `chunks` (a tar, plain or gzip'd) into `docker load` through
    an ArchiveFilter that removes every image name; return (Archive, the image IDs
    docker loaded, bytes received).

    A body that ends badly (ClientGone, framing errors, an archive the filter
    refuses) kills `docker load` before the archive's end, so nothing is loaded.
    When docker refuses the archive early the rest of the body is read and
    dropped, so the client still receives docker's message.
    """
    archive = Archive()
    tar = ArchiveFilter(archive)
    received = [0]
    body = _counted(chunks, received)
    process, finish = docker.start_load()
    try:
        fd = process.stdin.fileno()
        try:
            for chunk in gunzip_chunks(body):
                for piece in tar.feed(chunk):
                    _write_all(fd, piece)
            tail = tar.close()
            read_manifest(archive)      # refused before docker sees the end
            for piece in tail:
                _write_all(fd, piece)
        except BrokenPipeError:
            for _ in body:
                pass
        process.stdin.close()
        returncode = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        finish()
        raise
    output = finish()
    failure = load_failure(returncode, output)
    if failure:
        raise BadRequest("docker load failed: %s" % failure)
    return archive, docker.loaded_refs(output), received[0]


def choose_image(archive, loaded_ids, image_choice=None):
    """The ID of the image to deploy: the one the archive holds, or the one whose
    name in the archive is `image_choice`. BadRequest if that is not one image."""
    entries = read_manifest(archive)
    ids = [config_id(archive, entry) for entry in entries]
    names = archive_names(archive) or ids
    if image_choice is not None:
        wanted = {image_choice, image_choice + ":latest"}
        chosen = {i for entry, i in zip(entries, ids)
                  if wanted & set(entry.get("RepoTags") or []) or i == image_choice}
        if len(chosen) != 1:
            raise BadRequest("the archive holds %s, not %s" % (", ".join(names), image_choice))
    else:
        chosen = set(ids)
        if len(chosen) != 1:
            raise BadRequest("the archive holds several images (%s); choose one with "
                             "?image=REF" % ", ".join(names))
    image_id = chosen.pop()
    if image_id not in loaded_ids and len(set(ids)) == 1 and len(loaded_ids) == 1:
        # The containerd image store names an image by its manifest's digest,
        # not its config's: an archive of one image loads as that one ID.
        return loaded_ids[0]
    if image_id not in loaded_ids:
        raise DockerError("docker load reported %s, not the archive's %s"
                          % (", ".join(loaded_ids) or "nothing", image_id))
    return image_id


def borrowed_layers(image_layers, sent, own_images):
    """Indexes of the layers (diff IDs, base first) that are neither in the archive
    (`sent` digests) nor under the same chain in one of `own_images` (their layer
    lists): `docker load` takes a layer it has by chain ID and never reads the
    archive's file, so only a deployment's own images may stand in for one."""
    return [i for i, diff_id in enumerate(image_layers)
            if diff_id not in sent and
            not any(own[:i + 1] == image_layers[:i + 1] for own in own_images)]


def _layers(image):
    return list((image.get("RootFS") or {}).get("Layers") or [])


class Janitor:
    """Removes the images that failed and refused uploads added, and nothing else.

    An image an upload loaded that was not on the host before it began may still
    be one that another upload, running at the same time, loaded too and is about
    to tag. So the removal waits until no deployment is being changed, and then
    takes only images that carry no name: `docker rmi --no-prune` by ID, never
    forced, so docker itself refuses one that a container uses.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._busy = 0
        self._orphans = set()

    @contextlib.contextmanager
    def busy(self, docker):
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy and self._orphans:
                    orphans, self._orphans = self._orphans, set()
                    self._remove(docker, orphans)

    def discard(self, image_ids):
        """Remove these images once no deployment is being changed, if nothing names them."""
        with self._lock:
            self._orphans.update(image_ids)

    @staticmethod
    def _remove(docker, image_ids):
        try:
            images = docker.inspect("image", sorted(image_ids))
        except DockerError as exc:
            log.warning("cannot look at images %s to remove them: %s",
                        " ".join(sorted(image_ids)), exc)
            return
        for image_id, image in images.items():
            if image.get("RepoTags") or image.get("RepoDigests"):
                continue            # named since: someone else's now
            if docker.run_quietly("rmi", "--no-prune", image_id):
                log.info("removed image %s, loaded by a refused upload", image_id)


def parse_layers_request(value):
    """(image_id, layers) from the JSON body of a /layers request; BadRequest if
    it is not {"image_id": "sha256:...", "layers": ["sha256:...", ...]}."""
    if not isinstance(value, dict) or set(value) - {"image_id", "layers"}:
        raise BadRequest('send {"image_id": "sha256:...", "layers": ["sha256:...", ...]}')
    image_id, layers = value.get("image_id"), value.get("layers")
    if image_id is not None and not (isinstance(image_id, str) and DIGEST_RE.match(image_id)):
        raise BadRequest("image_id must be sha256: and 64 hex digits")
    if not isinstance(layers, list) or not all(
            isinstance(layer, str) and DIGEST_RE.match(layer) for layer in layers):
        raise BadRequest("layers must be a list of sha256: and 64 hex digits, base first")
    return image_id, layers


def describe(deployment, container):
    """The deployment's public state, from docker's JSON of its container (or None)."""
    if container is None:
        return {"name": deployment.name, "container": None, "state": "absent",
                "image": None, "image_id": None, "health": None, "started_at": None}
    state = container.get("State") or {}
    health = state.get("Health") or {}
    return {
        "name": deployment.name,
        "container": container.get("Name", "").lstrip("/"),
        "state": state.get("Status"),
        "image": (container.get("Config") or {}).get("Image"),
        "image_id": container.get("Image"),
        "health": health.get("Status"),
        "started_at": state.get("StartedAt") if state.get("Running") else None,
        "exit_code": None if state.get("Running") else state.get("ExitCode"),
    }


def _release_exit_code(returncode, container):
    """The release command's exit code as docker shows its container (`returncode` is
    the CLI's, None after a timeout); None when it did not run to an observed end."""
    state = (container or {}).get("State") or {}
    if returncode is None or state.get("Running"):
        return None
    if state.get("Status") == "exited":
        return state.get("ExitCode")
    # Never started (127: no such command) or never created (125): the CLI says why.
    return returncode or None


def _with_release(state, release):
    if release is not None:
        state["release"] = release
    return state


def _owned(deployment, container, label=LABEL):
    labels = (container.get("Config") or {}).get("Labels") or {}
    return labels.get(label) == deployment.name


# `docker run` options the release's one-off container leaves out of the deployment's
# args, each with whether it takes a value. Published ports and a fixed address are
# held by the running container; --restart would restart a command meant to end;
# a TTY would mangle the output; a network alias would route traffic to the one-off;
# a --cidfile already written by the running container makes `docker run` refuse;
# -d (refused in args, but it can hide in a bundle like -dit) would not wait for the end.
NOT_FOR_RELEASE = {
    "-p": True, "--publish": True, "-P": False, "--publish-all": False,
    "--ip": True, "--ip6": True, "--mac-address": True, "--network-alias": True,
    "--restart": True, "-t": False, "--tty": False, "-i": False, "--interactive": False,
    "--cidfile": True, "-d": False, "--detach": False,
}
RUN_SHORT_FLAGS = "diPqt"      # docker run's one-letter options that take no value


def _unbundle(arg):
    """docker's flag parser lets one-letter options share a dash, and the first one
    that takes a value takes the rest of the word: -itp8080:80 is -i -t -p 8080:80."""
    if not arg.startswith("-") or arg.startswith("--") or len(arg) <= 2:
        return [arg]
    words = []
    for index, letter in enumerate(arg[1:], 1):
        words.append("-" + letter)
        if letter not in RUN_SHORT_FLAGS:
            value = arg[index + 1:]
            return words + ([value[1:] if value.startswith("=") else value] if value else [])
    return words


def release_args(args):
    """The deployment's `docker run` args for its release container (see NOT_FOR_RELEASE):
    volumes, env files, networks and user stay, so the command sees what the app sees."""
    kept, skip_value = [], False
    for arg in args:
        words, left = _unbundle(arg), []
        for word in words:
            option, equals, _ = word.partition("=")
            if skip_value:
                skip_value = False
            elif option in NOT_FOR_RELEASE:
                skip_value = NOT_FOR_RELEASE[option] and not equals
            else:
                left.append(word)
        kept += [arg] if left == words else left    # untouched words stay as written
    return kept


def _short(container_id):
    return (container_id or "")[:12]


def _holds(check):
    """Whether the observation `check()` holds; a docker that does not answer says no."""
    try:
        return bool(check())
    except DockerError:
        return False


class Deployer:
    """What requests cause on the host. Callers hold the deployment's lock.

    Once edd knows a container's full ID it names the container by it: a name can
    be taken by someone else meanwhile, and docker reads a name it does not know
    as an ID prefix.
    """

    def __init__(self, docker, state_dir):
        self.docker = docker
        self.state_dir = state_dir

    # -- reading ------------------------------------------------------------

    def describe_all(self, deployments):
        containers = self.docker.inspect("container", [d.container for d in deployments])
        return [describe(d, containers.get(d.container)) for d in deployments]

    def describe(self, deployment):
        return describe(deployment, self.docker.container(deployment.container))

    def _describe_quietly(self, deployment):
        try:
            return self.describe(deployment)
        except DockerError as exc:
            return {"name": deployment.name, "state": "unknown",
                    "error": "docker did not answer: %s" % exc}

    def owned_container(self, deployment, name=None):
        """docker's JSON for the deployment's container, or None if there is none.

        A container of that name that edd did not create is never touched: Conflict.
        """
        return self._owned_containers(deployment, [name or deployment.container])[0]

    def _owned_containers(self, deployment, names):
        """docker's JSON (or None) for each of `names`, asked of docker in one call."""
        found = self.docker.inspect("container", names)
        for name, container in found.items():
            if not _owned(deployment, container):
                raise Conflict(
                    "container %r exists but edd did not create it (it lacks the label "
                    "%s=%s); remove or rename it by hand, e.g. `docker rename %s %s.manual`"
                    % (name, LABEL, deployment.name, name, name))
        return [found.get(name) for name in names]

    def shared_layers(self, deployment, layers):
        """How many leading `layers` (diff IDs, base first) the deployment's own images
        (current and previous) have: the most an upload to it may leave out. No other
        image is looked at, so the answer says nothing about what else the host holds."""
        images = self.docker.inspect("image", [deployment.tag("current"),
                                               deployment.tag("previous")])
        # The rule check_layers() applies to the upload that follows, with nothing sent.
        missing = borrowed_layers(layers, frozenset(), [_layers(i) for i in images.values()])
        return missing[0] if missing else len(layers)

    def stream_logs(self, deployment, tail):
        """A generator of the container's last `tail` lines of output, as docker sends them."""
        container = self.owned_container(deployment)
        if container is None:
            raise NotFound("deployment %r has no container" % deployment.name)
        return self.docker.stream(["logs", "--tail", str(tail), container["Id"]])

    # -- simple actions -----------------------------------------------------

    def start(self, deployment):
        self.recover(deployment)
        container = self.owned_container(deployment)
        if container is not None:
            container_id = container["Id"]
            self._step(lambda: self.docker.run("start", container_id),
                       lambda: run_state(self.docker.container(container_id)) == "running")
        elif self.docker.image_id(deployment.tag("current")):
            self._run_container(deployment)
        else:
            raise Conflict("deployment %r has no container and no image; push one first"
                           % deployment.name)
        return self.describe(deployment)

    def stop(self, deployment):
        self.recover(deployment)
        container = self._require_container(deployment)
        self.docker.stop(container["Id"], deployment.stop_timeout_seconds)
        return self.describe(deployment)

    def restart(self, deployment):
        self.recover(deployment)
        container = self._require_container(deployment)
        container_id, seconds = container["Id"], deployment.stop_timeout_seconds
        before = (container.get("State") or {}).get("StartedAt")

        def restarted():
            now = self.docker.container(container_id)
            return run_state(now) == "running" and now["State"].get("StartedAt") != before
        self._step(lambda: self.docker.run("restart", "-t", str(seconds), container_id,
                                           timeout=seconds + STOP_MARGIN_SECONDS),
                   restarted, wait=seconds + STOP_MARGIN_SECONDS)
        return self.describe(deployment)

    def delete(self, deployment):
        self.recover(deployment)
        container = self.owned_container(deployment)
        if container is not None:
            container_id = container["Id"]
            self.docker.stop(container_id, deployment.stop_timeout_seconds)
            self._step(lambda: self.docker.run("rm", container_id, timeout=DOCKER_TIMEOUT),
                       lambda: self.docker.container(container_id) is None)
        return self.describe(deployment)

    def _require_container(self, deployment):
        container = self.owned_container(deployment)
        if container is None:
            raise Conflict("deployment %r has no container; push an image first"
                           % deployment.name)
        return container

    def _run_container(self, deployment, verb=("run", "-d"), token=None):
        """Run (or create) the deployment's container from its current image; return
        what docker printed: the new container's ID."""
        labels = ["--label", "%s=%s" % (LABEL, deployment.name)]
        if token:
            labels += ["--label", "%s=%s" % (SWAP_LABEL, token)]
        return self.docker.run(
            *verb, "-it", *deployment.args, "--name", deployment.container, *labels,
            deployment.tag("current"), *deployment.command).strip()

    def _step(self, act, done, wait=0):
        """Run the docker step `act`. When docker reports failure, the observation
        `done()` decides (watched for up to `wait` seconds): the daemon may have done
        it anyway, or may still be doing it. Raise the DockerError if it did not."""
        try:
            act()
            return
        except DockerError as exc:
            error = exc
        deadline = time.monotonic() + wait
        while not _holds(done):
            if time.monotonic() >= deadline:
                raise error
            time.sleep(POLL_SECONDS)
        log.warning("docker reported %r, but the step is done", str(error))

    def _ensure(self, what, act, done):
        """Make the observation `done()` true by `act()`: return True once docker did
        it, or said it failed but `done()` holds (done before, or done anyway); else
        retry, UNDO_TRIES times with a growing pause, and return False. Never raises
        for docker's errors: they are logged."""
        for attempt in range(UNDO_TRIES):
            if attempt:
                time.sleep(RETRY_SECONDS * 2 ** (attempt - 1))
            try:
                act()
                return True
            except DockerError as exc:
                if _holds(done):
                    return True
                log.warning("%s: %s", what, exc)
        return False

    # -- an upload ----------------------------------------------------------

    def load(self, deployment, chunks, image_choice, janitor, request_id="-", audit=None):
        """Load the upload, check it, deploy it; return (Loaded, the new state, the
        names the archive had and that were ignored). Whatever image this upload
        added and does not end up running goes to `janitor`, also when it fails.
        The loaded image's id goes into `audit` as soon as it is known.
        """
        before = self.docker.image_ids()
        archive, loaded_ids, received = load_archive(self.docker, chunks)
        added = set(loaded_ids) - before
        names = archive_names(archive)
        image_id = None
        try:
            image_id = choose_image(archive, loaded_ids, image_choice)
            if audit is not None:
                audit["image_id"] = image_id
            self.check_layers(deployment, image_id, archive.digests())
            log.info("id=%s deployment=%s loaded %s", request_id, deployment.name,
                     format_fields(image_id=image_id, names=" ".join(names) or None,
                                   bytes=received))
            state = self.deploy(deployment, image_id)
        except BaseException:
            janitor.discard(added)
            raise
        janitor.discard(added - {image_id})
        return Loaded(image_id, names or [image_id], received), state, names

    def check_layers(self, deployment, image_id, sent):
        """Forbidden unless each layer of the image was in the archive (`sent` digests)
        or this deployment's own images have it, under the same chain."""
        refs = [image_id, deployment.tag("current"), deployment.tag("previous")]
        images = self.docker.inspect("image", refs)
        if image_id not in images:
            raise DockerError("docker load reported image %s, which docker does not have"
                              % image_id)
        own = [_layers(images[ref]) for ref in refs[1:] if ref in images]
        missing = borrowed_layers(_layers(images[image_id]), sent, own)
        if missing:
            raise Forbidden("the archive omits layers that deployment %s does not have "
                            "(layers %s of the image, counted from its base at 0)"
                            % (deployment.name, ", ".join(map(str, missing))),
                            refused="foreign-layers")

    # -- the release command ------------------------------------------------

    def _release(self, deployment, image_id):
        """Run the deployment's release_command in a one-off container from `image_id`;
        return {"exit_code": 0, "output": its last lines}, or None if it has none.

        deploy() calls this before it changes anything. A command that fails or runs
        past release_timeout_seconds raises EddError (502) with its exit code and
        output; "restored" then says whether docker still shows the deployment's
        container and current tag exactly as before the command ran.
        """
        if not deployment.release_command:
            return None
        before = self._release_snapshot(deployment)
        leftover = self._remove_release_container(deployment)
        if leftover:
            raise DockerError(leftover)
        started = time.monotonic()
        returncode, output = self.docker.run_attached(
            ["run", "--name", deployment.release_container,
             "--label", "%s=%s" % (RELEASE_LABEL, deployment.name),
             *release_args(deployment.args), image_id, *deployment.release_command],
            deployment.release_timeout_seconds, RELEASE_TAIL_LINES)
        # docker's view of the container decides, not the CLI's status: a CLI that
        # was cut off or lost the daemon leaves the container running.
        exit_code = _release_exit_code(returncode, self._release_container(deployment))
        leftover = self._remove_release_container(deployment)
        release = {"exit_code": exit_code, "output": output}
        last_line = (output.strip().splitlines() or [""])[-1]
        log.log(logging.INFO if exit_code == 0 else logging.WARNING,
                "deployment %s: release command exited %s after %.1f s: %s",
                deployment.name, exit_code, time.monotonic() - started, last_line)
        if exit_code == 0:
            if leftover:
                log.warning("deployment %s: %s", deployment.name, leftover)
            return release
        raise EddError(self._release_failure(deployment, returncode, exit_code, before,
                                             leftover),
                       status=502, restored=self._unchanged(deployment, before),
                       release=release, deployment=self.describe(deployment))

    def _release_failure(self, deployment, returncode, exit_code, before, leftover):
        """The error message of a failed release: what happened and what it left."""
        if returncode is None:
            what = ("the release command did not finish within %g s and was stopped"
                    % deployment.release_timeout_seconds)
        elif exit_code is None:
            what = ("`docker run` of the release command ended (status %d) but docker "
                    "does not show the command ending; it was stopped" % returncode)
        else:
            what = "the release command failed with exit code %d" % exit_code
        kept = ("the running container never stopped" if before["running"]
                else "the deployment is as it was")
        return "%s; nothing was changed, %s%s" % (what, kept, "; " + leftover if leftover
                                                  else "")

    def _release_snapshot(self, deployment):
        """What a release must leave as it found it: the deployment's container (id,
        running, start time) and the image its current tag names."""
        container = self.docker.container(deployment.container) or {}
        state = container.get("State") or {}
        return {"container": container.get("Id"), "running": state.get("Running"),
                "started_at": state.get("StartedAt"),
                "current": self.docker.image_id(deployment.tag("current"))}

    def _unchanged(self, deployment, before):
        try:
            return self._release_snapshot(deployment) == before
        except DockerError as exc:
            log.warning("deployment %s: cannot confirm it is as it was: %s",
                        deployment.name, exc)
            return False

    def _release_container(self, deployment):
        return self.docker.container(deployment.release_container)

    def _remove_release_container(self, deployment):
        """Remove the deployment's release container if there is one; return what is
        left when docker could not remove it, or None."""
        container = self._release_container(deployment)
        if container is None:
            return None
        if not _owned(deployment, container, RELEASE_LABEL):
            raise Conflict(
                "container %r exists but edd did not create it (it lacks the label %s=%s); "
                "remove or rename it by hand" % (deployment.release_container,
                                                 RELEASE_LABEL, deployment.name))
        self.docker.run_quietly("rm", "-f", container["Id"])
        if self.docker.container(container["Id"]) is None:
            return None
        return ("the release container %s could not be removed; edd removes it before "
                "the next release or when it starts" % deployment.release_container)

    def remove_release_leftovers(self, deployments):
        """Remove the release containers of `deployments` that an edd killed during a
        release left behind, found by their label; return how many were removed."""
        removed = 0
        for deployment in deployments:
            # By label value, not a --format of it: docker's and podman's ps
            # templates spell a label's value differently.
            listing = self.docker.run("ps", "-a", "-q", "--no-trunc", "--filter", "label=%s=%s"
                                      % (RELEASE_LABEL, deployment.name))
            for container_id in listing.split():
                log.warning("deployment %s: removing release container %s left by an "
                            "interrupted release", deployment.name, container_id)
                removed += self.docker.run_quietly("rm", "-f", container_id)
        return removed

    # -- the swap -----------------------------------------------------------

    def rollback(self, deployment):
        self.recover(deployment)
        previous = self.docker.image_id(deployment.tag("previous"))
        if previous is None:
            raise Conflict("deployment %r has no previous image to roll back to"
                           % deployment.name)
        if previous == self.docker.image_id(deployment.tag("current")):
            raise Conflict("deployment %r is already running its previous image %s"
                           % (deployment.name, previous))
        return self.deploy(deployment, previous)

    def deploy(self, deployment, image_id):
        """Replace the deployment's container with one running `image_id`.

        Steps: park the old container (rename it while it still serves), tag the
        image current, create the new container, stop the old one, start the new
        one, wait for the gate: the service is down only from stop to start. Each
        step is recorded in state_dir first, so that a crash anywhere leaves a
        record that recover() finishes (after the gate passed) or undoes (before).
        On success the replaced image becomes previous and the parked container is
        removed. On any failure the swap is undone and the EddError raised says
        what docker then shows: "restored" is true only if the old container is
        back under its name, in its state, with its image current. Return the
        deployment's new state.
        """
        self.recover(deployment)
        old, parked = self._owned_containers(deployment, [deployment.container,
                                                          deployment.parked_container])
        if parked is not None:
            raise Conflict(
                "container %s is left from a swap that edd has no record of; remove it "
                "(`docker rm -f %s`) or rename it back by hand"
                % (deployment.parked_container, parked["Id"]))
        # Nothing has changed so far: the release command runs now, while the old
        # container serves; it raises if it fails, and then nothing changes at all.
        release = self._release(deployment, image_id)
        record = self._begin(deployment, old, image_id)
        try:
            self._swap(deployment, record)
            container = self._gate(deployment, record["new_id"])
            record["phase"] = "committed"
            write_record(self.state_dir, deployment.name, record)
        except Exception as exc:
            error = self._failed(deployment, record, exc)
            _with_release(error.extra, release)
            raise error from None
        self._finish(deployment, record)
        return _with_release(describe(deployment, container), release)

    def _begin(self, deployment, old, image_id):
        """Record the swap about to start, with everything needed to undo it."""
        tags = [deployment.tag("current"), deployment.tag("previous")]
        images = self.docker.inspect("image", tags)
        current_id, previous_id = (images[tag]["Id"] if tag in images else None
                                   for tag in tags)
        record = {
            "deployment": deployment.name, "phase": "swapping", "image_id": image_id,
            "token": secrets.token_hex(8), "new_id": None, "current_id": current_id,
            "previous_id": previous_id,
            "old": old and {"id": old["Id"], "state": run_state(old)},
        }
        try:
            write_record(self.state_dir, deployment.name, record)
        except OSError as exc:
            raise EddError("cannot record the swap in %s: %s"
                           % (self.state_dir, exc.strerror or exc)) from None
        return record

    def _swap(self, deployment, record):
        """Park, tag, create, stop, start: the steps before the gate, each checked."""
        docker, old, current = self.docker, record["old"], deployment.tag("current")
        if old:
            self._step(lambda: docker.run("rename", old["id"], deployment.parked_container),
                       lambda: self._named(old["id"]) == deployment.parked_container)
        self._step(lambda: docker.run("tag", record["image_id"], current),
                   lambda: docker.image_id(current) == record["image_id"])
        record["new_id"] = self._create(deployment, record["token"])
        write_record(self.state_dir, deployment.name, record)
        if old and old["state"] != "stopped":
            docker.stop(old["id"], deployment.stop_timeout_seconds)
        new_id = record["new_id"]
        self._step(lambda: docker.run("start", new_id),
                   lambda: run_state(docker.container(new_id)) == "running")

    def _create(self, deployment, token):
        """Create the new container; return its ID, found by its swap label if docker
        reported failure after creating it."""
        try:
            return self._run_container(deployment, ("create",), token)
        except DockerError as exc:
            found = self.docker.swap_containers(deployment.name, token)
            if len(found) != 1:
                raise exc
            log.warning("docker create reported %r, but created %s", str(exc), found[0])
            return found[0]

    def _named(self, container_id):
        container = self.docker.container(container_id)
        return container and container.get("Name", "").lstrip("/")

    def _gate(self, deployment, container_id):
        """Return docker's JSON of the new container once it has run settle_seconds (and
        is healthy if the image has a HEALTHCHECK); raise EddError if it exits, restarts
        (a crash loop under a restart policy) or is not healthy in time."""
        started = time.monotonic()
        first_start = None
        while True:
            container = self.docker.container(container_id) or {}
            state = container.get("State") or {}
            health = (state.get("Health") or {}).get("Status")
            waited = time.monotonic() - started
            if state.get("Status") != "running":
                raise EddError("the new container is %s (exit code %s) after %.1f s"
                               % (state.get("Status", "gone"), state.get("ExitCode"), waited),
                               status=502)
            first_start = first_start or state.get("StartedAt")
            if container.get("RestartCount") or state.get("StartedAt") != first_start:
                raise EddError("the new container exited and was restarted (%s restarts) "
                               "within %.1f s: it crashes" % (container.get("RestartCount"),
                                                              waited), status=502)
            if health == "unhealthy":
                raise EddError("the new container's health check failed", status=502)
            if waited >= deployment.settle_seconds and health in (None, "healthy"):
                return container
            if health == "starting" and waited >= deployment.health_timeout_seconds:
                raise EddError("the new container was not healthy within %g s"
                               % deployment.health_timeout_seconds, status=502)
            if health == "starting":
                self.docker.run_due_healthcheck(container)
            settling = deployment.settle_seconds - waited
            time.sleep(min(POLL_SECONDS, settling) if settling > 0 else HEALTH_POLL_SECONDS)

    def _finish(self, deployment, record):
        """Complete a swap that passed its gate: the replaced image becomes previous
        (the tag moves, so previous is never missing), the parked container goes.
        Return True when done; the record is then removed."""
        docker, replaced, previous = self.docker, record["current_id"], deployment.tag("previous")
        done = True
        if replaced and replaced != record["image_id"]:
            done = self._ensure("deployment %s: tag %s" % (deployment.name, previous),
                                lambda: docker.run("tag", replaced, previous),
                                lambda: docker.image_id(previous) == replaced)
            dropped = record["previous_id"]
            if done and dropped not in (None, replaced, record["image_id"]):
                self._drop_image(dropped)
        if record["old"]:
            parked_id = record["old"]["id"]
            done &= self._ensure(
                "deployment %s: remove the parked container" % deployment.name,
                lambda: docker.run("rm", "-f", parked_id,
                                   timeout=deployment.stop_timeout_seconds + STOP_MARGIN_SECONDS),
                lambda: docker.container(parked_id) is None)
        if done:
            self._forget(deployment)
        else:
            log.warning("deployment %s: the swap succeeded, but its clean-up did not finish; "
                        "edd tries again at its next start or change of the deployment",
                        deployment.name)
        return done

    def _drop_image(self, image_id):
        """Delete an image edd untagged, unless something else names or runs it: edd
        removes only images it replaced itself, never a global prune."""
        try:
            image = self.docker.inspect("image", [image_id]).get(image_id)
        except DockerError:
            return
        if image and not image.get("RepoTags"):
            self.docker.run_quietly("rmi", image_id)

    def _forget(self, deployment):
        try:
            remove_record(self.state_dir, deployment.name)
        except OSError as exc:
            log.error("deployment %s: cannot remove the swap record: %s", deployment.name, exc)

    # -- the undo -----------------------------------------------------------

    def _failed(self, deployment, record, exc):
        """Undo the swap that failed with `exc`; return the EddError telling the client
        what docker shows afterwards, as observed, not as intended."""
        if not isinstance(exc, EddError):
            log.error("deployment %s: unexpected error in a swap", deployment.name,
                      exc_info=exc)
        container_log = self._collect_log(record["new_id"])
        problems = self._undo(deployment, record)
        restored = not problems
        old = record["old"]
        if restored:
            self._forget(deployment)
            message = "deploy failed, %s: %s" % (
                "the deployment is as it was" if old is None else
                "the previous container runs as before" if old["state"] == "running" else
                "the previous container is back, %s as before" % old["state"], exc)
        else:
            self._report_unrestored(deployment, record, problems)
            message = ("deploy failed, and the previous state could not be put back (%s): %s"
                       % ("; ".join(problems), exc))
        return EddError(message, status=getattr(exc, "status", 500), restored=restored,
                        log=container_log, deployment=self._describe_quietly(deployment))

    def _collect_log(self, container_id):
        if not container_id:
            return ""
        try:
            return self.docker.logs(container_id, LOG_TAIL_LINES, timeout=LOG_TIMEOUT)
        except DockerError as exc:
            return "(no log: %s)" % exc

    def _undo(self, deployment, record):
        """Put back what the recorded swap changed, each step checked and retried; return
        what still differs from before the swap (empty: restored). Never raises."""
        try:
            self._undo_steps(deployment, record)
        except Exception:
            log.exception("deployment %s: error while undoing a swap", deployment.name)
        try:
            return self._unrestored(deployment, record)
        except Exception as exc:
            return ["docker cannot tell what is there: %s" % exc]

    def _undo_steps(self, deployment, record):
        docker, name, old = self.docker, deployment.name, record["old"]
        for new_id in self._new_containers(record):
            self._ensure("deployment %s: remove the new container" % name,
                         lambda: docker.run("rm", "-f", new_id, timeout=(
                             deployment.stop_timeout_seconds + STOP_MARGIN_SECONDS)),
                         lambda: docker.container(new_id) is None)
        current, current_id = deployment.tag("current"), record["current_id"]
        self._ensure("deployment %s: put back %s" % (name, current),
                     lambda: docker.run("tag", current_id, current) if current_id
                     else docker.run("rmi", current),
                     lambda: docker.image_id(current) == current_id)
        if old:
            # Only by ID, and only the container this swap parked: a container that
            # took the name meanwhile is not edd's to remove.
            self._ensure("deployment %s: rename the old container back" % name,
                         lambda: docker.run("rename", old["id"], deployment.container),
                         lambda: self._named(old["id"]) == deployment.container)
            self._ensure("deployment %s: put the old container back %s" % (name, old["state"]),
                         lambda: self._bring_to(deployment, old["id"], old["state"]),
                         lambda: run_state(docker.container(old["id"])) == old["state"])

    def _new_containers(self, record):
        """The IDs of what the swap created: the recorded one, and any carrying its label
        (docker may have created it without edd learning the ID)."""
        found = [record["new_id"]] if record["new_id"] else []
        try:
            found += [c for c in self.docker.swap_containers(record["deployment"], record["token"])
                      if c not in found]
        except DockerError as exc:
            log.warning("deployment %s: cannot list the swap's containers: %s",
                        record["deployment"], exc)
        return found

    def _bring_to(self, deployment, container_id, wanted):
        """Start, pause, unpause or stop the container until it is `wanted`."""
        have = run_state(self.docker.container(container_id))
        if wanted == "stopped" and have != "stopped":
            self.docker.stop(container_id, deployment.stop_timeout_seconds)
            return
        if have == "stopped" and wanted != "stopped":
            self.docker.run("start", container_id)
            have = "running"
        if have == "running" and wanted == "paused":
            self.docker.run("pause", container_id)
        elif have == "paused" and wanted == "running":
            self.docker.run("unpause", container_id)

    def _unrestored(self, deployment, record):
        """What docker shows that differs from before the swap, as sentences."""
        docker, old, problems = self.docker, record["old"], []
        new_ids = [record["new_id"]] if record["new_id"] else []
        for new_id in set(new_ids + docker.swap_containers(deployment.name, record["token"])):
            if docker.container(new_id) is not None:
                problems.append("the new container %s is still there" % _short(new_id))
        current = docker.image_id(deployment.tag("current"))
        if current != record["current_id"]:
            problems.append("%s is %s, not %s" % (deployment.tag("current"), current or "absent",
                                                  record["current_id"] or "absent"))
        if old:
            container = docker.container(old["id"])
            if container is None:
                problems.append("the old container %s is gone" % _short(old["id"]))
                return problems
            name = container.get("Name", "").lstrip("/")
            if name != deployment.container:
                holder = docker.container(deployment.container)
                problems.append("the old container %s is named %s%s" % (
                    _short(old["id"]), name, "" if holder is None else
                    ", as %s is taken by container %s" % (deployment.container,
                                                        _short(holder.get("Id")))))
            if run_state(container) != old["state"]:
                problems.append("the old container is %s, not %s"
                                % (run_state(container), old["state"]))
        return problems

    def _report_unrestored(self, deployment, record, problems):
        """One ERROR line: what is wrong, and the docker commands that put it right."""
        fix = []
        for new_id in [record["new_id"]] if record["new_id"] else []:
            fix.append("docker rm -f %s" % new_id)
        fix.append("docker tag %s %s" % (record["current_id"], deployment.tag("current"))
                   if record["current_id"] else "docker rmi %s" % deployment.tag("current"))
        old = record["old"]
        if old:
            fix.append("docker rename %s %s" % (old["id"], deployment.container))
            fix += {"running": ["docker start %s" % old["id"]],
                    "paused": ["docker start %s" % old["id"], "docker pause %s" % old["id"]],
                    "stopped": []}[old["state"]]
        log.error("deployment %s: a failed swap could not be undone: %s. To fix it by hand: "
                  "%s. edd tries the undo again at its next start or change of the deployment",
                  deployment.name, "; ".join(problems), "; ".join(fix))

    # -- recovery -----------------------------------------------------------

    def recover(self, deployment):
        """Complete the deployment's recorded swap, left by a crash or a failed undo:
        finish it if it had passed its gate, undo it if not. Return True if there was
        one; raise EddError if it cannot be completed now."""
        record = read_record(self.state_dir, deployment.name)
        if record is None:
            return False
        if record["phase"] == "committed":
            log.warning("deployment %s: finishing a swap that passed its gate",
                        deployment.name)
            if not self._finish(deployment, record):
                raise EddError("deployment %r: an earlier swap succeeded but its clean-up "
                               "failed; edd's log has the details" % deployment.name,
                               status=502)
            return True
        log.warning("deployment %s: undoing a swap that was interrupted", deployment.name)
        problems = self._undo(deployment, record)
        if problems:
            self._report_unrestored(deployment, record, problems)
            raise EddError("deployment %r: an earlier swap could not be undone: %s"
                           % (deployment.name, "; ".join(problems)), status=502,
                           restored=False, deployment=self._describe_quietly(deployment))
        self._forget(deployment)
        return True


# ---------------------------------------------------------------------------
# Authorization and bookkeeping shared by requests
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Client:
    """Who is on the other end, from the certificate the handshake verified.

    `identities` holds typed strings, one namespace per kind so that no kind can
    pass for another: the subject CN as is ("alice"), "dns:NAME" for each DNS
    subjectAltName, "email:ADDRESS" for each email one. A certificate with several
    CNs is `refused`: which of them names the client would be a guess.
    """
    name: str                       # for log lines: the CN, else the first SAN
    identities: frozenset
    serial: str = "-"
    not_before: float = 0.0
    not_after: float = float("inf")
    refused: str = None             # why this certificate may do nothing

    @classmethod
    def from_cert(cls, cert):
        cert = cert or {}
        cns = [value for rdn in cert.get("subject", ()) for key, value in rdn
               if key == "commonName"]
        sans = ["%s:%s" % (SAN_KINDS[kind], value)
                for kind, value in cert.get("subjectAltName", ()) if kind in SAN_KINDS]
        refused = None
        if len(cns) > 1:
            refused = "the certificate has %d subject CNs; edd accepts one" % len(cns)
        identities = frozenset(([] if refused else cns) + sans)
        names = cns + sans
        return cls(names[0] if names else "-", identities, cert.get("serialNumber", "-"),
                   _cert_time(cert, "notBefore", 0.0),
                   _cert_time(cert, "notAfter", float("inf")), refused)

    def check(self, now=None):
        """Raise Forbidden unless this certificate may make a request now."""
        now = time.time() if now is None else now
        if self.refused:
            raise Forbidden(self.refused)
        if not self.not_before <= now <= self.not_after:
            raise Forbidden("the client certificate is not valid now (valid %s to %s)"
                            % (_utc(self.not_before), _utc(self.not_after)))


SAN_KINDS = {"DNS": "dns", "email": "email"}


def _cert_time(cert, key, default):
    try:
        return float(ssl.cert_time_to_seconds(cert[key]))
    except (KeyError, ValueError):
        return default


def _utc(seconds):
    if seconds in (0.0, float("inf")):
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")


def granting_identity(config, client, deployment):
    """The identity that lets `client` use `deployment` ("*" when the deployment has
    no `clients`), or None if it may not."""
    for allowed in (config.admins, deployment.clients):
        if allowed is None:
            return "*"
        granted = sorted(client.identities & allowed)
        if granted:
            return granted[0]
    return None


def may_use(config, client, deployment):
    return granting_identity(config, client, deployment) is not None


class Metrics:
    """Counters and one histogram, rendered in Prometheus' text format."""
    HELP = {
        "edd_requests_total": ("counter", "HTTP requests answered, by status."),
        "edd_deploys_total": ("counter", "Loads and rollbacks, by deployment and outcome."),
        "edd_restores_total": ("counter", "Failed deploys after which the old state was "
                                          "seen restored."),
        "edd_recoveries_total": ("counter", "Unfinished swaps completed at startup."),
        "edd_upload_bytes_total": ("counter", "Image archive bytes received."),
        "edd_deploy_duration_seconds": ("histogram", "Time from request to deployed or restored."),
        "edd_build_info": ("gauge", "edd's version and Python's."),
    }
    BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

    def __init__(self):
        self._lock = threading.Lock()
        self._values = {("edd_build_info", (("python", sys.version.split()[0]),
                                            ("version", __version__))): 1}
        self._histograms = {}

    def count(self, name, amount=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def observe(self, name, seconds, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            counts = self._histograms.setdefault(key, [0] * (len(self.BUCKETS) + 2))
            counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
            counts[-1] += seconds

    def render(self, visible=lambda deployment: True):
        """The text format; series of deployments for which visible(name) is false are
        left out."""
        def shown(key):
            return visible(dict(key[1]).get("deployment")) if "deployment" in dict(key[1]) \
                else True
        with self._lock:
            values = {key: value for key, value in self._values.items() if shown(key)}
            histograms = {key: list(counts) for key, counts in self._histograms.items()
                          if shown(key)}
        lines = []
        for name, (kind, text) in self.HELP.items():
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            for (metric, labels), value in sorted(values.items()):
                if metric == name:
                    lines.append("%s%s %s" % (name, _labels(labels), _number(value)))
            for (metric, labels), counts in sorted(histograms.items()):
                if metric == name:
                    lines += self._histogram_lines(name, labels, counts)
        return "\n".join(lines) + "\n"

    def _histogram_lines(self, name, labels, counts):
        lines, total = [], 0
        for bound, count in zip(self.BUCKETS + ("+Inf",), counts):
            total += count
            lines.append("%s_bucket%s %d" % (name, _labels(labels + (("le", str(bound)),)),
                                             total))
        lines.append("%s_sum%s %s" % (name, _labels(labels), _number(counts[-1])))
        lines.append("%s_count%s %d" % (name, _labels(labels), total))
        return lines


def _labels(labels):
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\")
                                          .replace('"', '\\"').replace("\n", "\\n"))
                             for key, value in labels)


def _number(value):
    return repr(float(value)) if isinstance(value, float) else str(value)


def detect_engine(docker):
    """Learn and log the engine behind `docker`; an engine that is down is only a
    warning (edd can start before it), and /v1/health asks again."""
    try:
        log.info("engine: %s, via the CLI %s", docker.detect(), docker.command)
    except DockerError as exc:
        log.warning("engine: %s, via the CLI %s, is not answering: %s",
                    docker.engine.kind, docker.command, exc)
    return docker


class App:
    """The daemon's state: config, TLS context, docker, locks, metrics. Reload swaps
    config and TLS context whole; requests already running keep the ones they took."""

    def __init__(self, config):
        self.config = config
        # The context and a fingerprint of the trust it carries, swapped together:
        # a connection made under other trust is ended (see Server.end_stale).
        self.tls = (make_ssl_context(config), tls_fingerprint(config))
        try:
            os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError("%s: state_dir: cannot create %s: %s"
                              % (config.path, config.state_dir, exc.strerror)) from None
        self.deployer = Deployer(detect_engine(Docker(config.docker)), config.state_dir)
        self.janitor = Janitor()
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self._busy = {}             # deployment name -> (what holds it, its lock file)
        self._busy_lock = threading.Lock()

    @property
    def ssl_context(self):
        return self.tls[0]

    def reload(self):
        """Re-read the config file and TLS files; keep the running ones if they fail.

        Return True if the config was taken. `trust_changed` tells whether client_ca
        or the server's certificate changed, i.e. whether open connections are stale.
        """
        try:
            config = load_config(self.config.path)
            context = make_ssl_context(config)
            fingerprint = tls_fingerprint(config)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return False
        if config.listen != self.config.listen:
            log.warning("listen changed to %s:%d; that takes a restart", *config.listen)
            config = dataclasses.replace(config, listen=self.config.listen)
        if config.state_dir != self.config.state_dir:
            # Swap records and locks of running requests are in the old one.
            log.warning("state_dir changed to %s; that takes a restart", config.state_dir)
            config = dataclasses.replace(config, state_dir=self.config.state_dir)
        self.trust_changed = fingerprint != self.tls[1]
        self.config, self.tls = config, (context, fingerprint)
        self.deployer = Deployer(detect_engine(Docker(config.docker)), config.state_dir)
        log.info("reloaded %s: %d deployments%s", config.path, len(config.deployments),
                 "; TLS files changed, closing connections made before"
                 if self.trust_changed else "")
        return True

    trust_changed = False

    def authorize(self, client, name):
        """The named deployment if `client` may use it; NotFound otherwise (NotAllowed
        when it exists: to the client the two look the same)."""
        deployment = self.config.deployments.get(name)
        if deployment is None:
            raise NotFound("no deployment named %r" % name)
        if not may_use(self.config, client, deployment):
            raise NotAllowed("no deployment named %r" % name)
        return deployment

    def hold(self, deployment, what):
        """Mark the deployment busy with `what`, here and for other edd processes that
        share state_dir; raise Conflict if it already is."""
        with self._busy_lock:
            self._refuse_if_busy(deployment)
            lock = lock_deployment(self.config.state_dir, deployment.name)
            self._busy[deployment.name] = (what, lock)

    def check_free(self, deployment):
        """Conflict if the deployment is busy now: what a rollout's preflight asks of
        /layers, so that a push meeting another one changes nothing anywhere."""
        with self._busy_lock:
            self._refuse_if_busy(deployment)

    def _refuse_if_busy(self, deployment):
        if deployment.name in self._busy:
            raise Conflict("deployment %r is busy: %s" % (deployment.name,
                                                         self._busy[deployment.name][0]))

    def release(self, deployment):
        with self._busy_lock:
            what, lock = self._busy.pop(deployment.name, (None, None))
        if lock is not None:
            os.close(lock)

    def busy(self):
        """What holds deployments now, e.g. ["load by alice (request 1f2e3d4c)"]."""
        with self._busy_lock:
            return [what for what, lock in self._busy.values()]

    def recover_all(self):
        """Complete the swaps that edd left unfinished (killed, or an undo that failed).
        While docker does not answer, keep trying in the background."""
        if not self._docker_answers():
            log.error("docker is not answering; unfinished swaps will be completed "
                      "when it does")
            threading.Thread(target=self._recover_when_docker_answers, name="recovery",
                             daemon=True).start()
            return
        self._recover_each()

    def _docker_answers(self):
        return _holds(lambda: self.deployer.docker.run(
            "version", "--format", "{{.Server.Version}}", timeout=DOCKER_TIMEOUT))

    def _recover_when_docker_answers(self):
        pause = 1
        while not self.stopping.wait(pause):
            if self._docker_answers():
                log.info("docker answers again")
                self._recover_each()
                return
            pause = min(pause * 2, 30)

    def _recover_each(self):
        for deployment in list(self.config.deployments.values()):
            try:
                self.hold(deployment, "recovery at start-up")
            except EddError as exc:     # another edd process is in the middle of it
                log.info("deployment %s: not recovering it: %s", deployment.name, exc)
                continue
            try:
                self.deployer.remove_release_leftovers([deployment])
                if self.deployer.recover(deployment):
                    self.metrics.count("edd_recoveries_total", deployment=deployment.name)
            except EddError as exc:
                log.error("deployment %s: could not complete an unfinished swap: %s",
                          deployment.name, exc)
            finally:
                self.release(deployment)


# ---------------------------------------------------------------------------
# HTTP: request bodies
# ---------------------------------------------------------------------------

def body_length(headers, limit):
    """The upload's length from its headers, or None when it is chunked.

    Raise the 4xx that bad framing deserves: both framings or neither, a
    Content-Length that is not one number, a body larger than `limit`.
    """
    encodings = [c.strip().lower() for v in headers.get_all("Transfer-Encoding", [])
                 for c in v.split(",")]
    lengths = {v.strip() for v in headers.get_all("Content-Length", []) for v in v.split(",")}
    if encodings and lengths:
        raise BadRequest("send either Content-Length or Transfer-Encoding, not both")
    if encodings:
        if encodings != ["chunked"]:
            raise BadRequest("only Transfer-Encoding: chunked is supported")
        return None
    if not lengths:
        raise LengthRequired("an upload needs Content-Length or Transfer-Encoding: chunked")
    if len(lengths) != 1 or not re.match(r"[0-9]{1,20}\Z", next(iter(lengths))):
        raise BadRequest("Content-Length must be one whole number")
    length = int(lengths.pop())
    if length > limit:
        raise PayloadTooLarge("upload of %d bytes is larger than max_upload_bytes (%d)"
                              % (length, limit))
    return length


class PacedReader:
    """An rfile that ends an upload slower than `rate` bytes a second on average.

    A timeout per read alone lets a client keep a deployment locked forever by
    sending a byte now and then. The first `grace` seconds are free (a slow start,
    TLS, docker warming up); after that the bytes received must keep up with
    `rate` times the time taken. rate 0: no minimum.
    """

    def __init__(self, rfile, sock, rate, grace):
        self.rfile, self.sock, self.rate, self.grace = rfile, sock, rate, grace
        self.started = time.monotonic()
        self.received = 0

    def _call(self, method, *args):
        due = max(self.grace, self.received / self.rate) if self.rate else float("inf")
        left = due - (time.monotonic() - self.started)
        if left <= 0:
            raise self._too_slow()
        self.sock.settimeout(min(self.grace, left))
        try:
            got = method(*args)
        except socket.timeout:
            if time.monotonic() - self.started >= due:
                raise self._too_slow() from None
            raise
        self.received += got if isinstance(got, int) else len(got)
        return got

    def _too_slow(self):
        return EddError("upload aborted: %d bytes in %.0f s is slower than "
                        "upload_min_bytes_per_second (%d)"
                        % (self.received, time.monotonic() - self.started, self.rate),
                        status=408)

    def readinto1(self, view):
        return self._call(self.rfile.readinto1, view)

    def readline(self, size=-1):
        return self._call(self.rfile.readline, size)


class LengthBody:
    """A body of known length read from `rfile`."""

    def __init__(self, rfile, length):
        self.rfile = rfile
        self.left = length
        self.received = 0

    def readinto(self, view):
        """Fill `view` with the body's next bytes; return how many (0 at the end)."""
        want = min(len(view), self.left)
        filled = 0
        while filled < want:
            # readinto1, one socket read at a time: what has arrived is counted
            # even when the next read times out.
            got = self.rfile.readinto1(view[filled:want])
            if not got:
                raise ClientGone("the client closed the connection after %d of %d bytes"
                                 % (self.received, self.received + self.left))
            filled += got
            self.left -= got
            self.received += got
        return filled


class ChunkedBody:
    """A `Transfer-Encoding: chunked` body read from `rfile`, at most `limit` bytes."""

    def __init__(self, rfile, limit):
        self.rfile = rfile
        self.limit = limit
        self.chunk_left = 0
        self.done = False
        self.received = 0

    def readinto(self, view):
        """Fill `view` across chunks; return how many bytes (0 after the last chunk)."""
        filled = 0
        while filled < len(view) and not self.done:
            if self.chunk_left == 0:
                self.chunk_left = self._chunk_size()
                if self.chunk_left == 0:
                    self._skip_trailers()
                    self.done = True
                    break
            want = min(len(view) - filled, self.chunk_left)
            got = self.rfile.readinto1(view[filled:filled + want])
            if not got:
                raise ClientGone("the client closed the connection inside a chunk")
            filled += got
            self.chunk_left -= got
            self.received += got
            if self.chunk_left == 0:
                self._end_of_chunk()
        return filled

    def _line(self):
        line = self.rfile.readline(MAX_CHUNK_LINE + 1)
        if not line:
            raise ClientGone("the client closed the connection before the last chunk")
        if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\r\n"):
            raise BadRequest("malformed chunked body: line too long or not ended by CRLF")
        return line[:-2]

    def _chunk_size(self):
        size = self._line().split(b";", 1)[0].strip()
        if not re.match(rb"[0-9a-fA-F]{1,16}\Z", size):
            raise BadRequest("malformed chunked body: bad chunk size %r" % size[:40])
        size = int(size, 16)
        if self.received + size > self.limit:
            raise PayloadTooLarge("upload is larger than max_upload_bytes (%d)" % self.limit)
        return size

    def _end_of_chunk(self):
        if self._line() != b"":
            raise BadRequest("malformed chunked body: chunk data longer than its size")

    def _skip_trailers(self):
        while self._line() != b"":
            pass


# ---------------------------------------------------------------------------
# HTTP: routes
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple = ()
    stream: object = None           # a generator of bytes sent instead of body


def json_text(value):
    """edd's JSON as text, the server's answers and `edd.py push --json` alike."""
    return json.dumps(value, indent=2) + "\n"


def json_response(status, value, headers=()):
    return Response(status, json_text(value).encode(), headers=headers)


def error_response(exc):
    headers = (("Allow", ", ".join(exc.allowed)),) if isinstance(exc, MethodNotAllowed) else ()
    return json_response(exc.status, dict({"error": str(exc)}, **exc.extra), headers)


ROUTES = []     # (method, compiled path, function, action)


def route(method, template, action=None):
    """Register a route; /v1/deployments/{name}/ACTION also answers as /v1/{name}/ACTION."""
    def register(function):
        templates = [template]
        if template.startswith("/v1/deployments/{name}/"):
            templates.append(template.replace("/v1/deployments/", "/v1/", 1))
        for text in templates:
            # Names are matched raw, never percent-decoded: /v1/deployments/a%2Fb is 404.
            pattern = re.compile(re.escape(text).replace(re.escape("{name}"),
                                                         "(?P<name>[a-z0-9._-]+)") + r"\Z")
            ROUTES.append((method, pattern, function, action))
        return function
    return register


def match_route(method, path):
    """(function, path parameters, action) for the request; NotFound or MethodNotAllowed.

    HEAD runs the GET route: the handler sends its headers and leaves out the body."""
    allowed = []
    for route_method, pattern, function, action in ROUTES:
        match = pattern.match(path)
        if match:
            methods = (route_method, "HEAD") if route_method == "GET" else (route_method,)
            if method in methods:
                return function, match.groupdict(), action
            allowed.extend(methods)
    if allowed:
        raise MethodNotAllowed(sorted(set(allowed)))
    raise NotFound("no such route: %s" % path)


@route("GET", "/v1/deployments")
def list_deployments(app, request):
    usable = [d for d in app.config.deployments.values()
              if may_use(app.config, request.client, d)]
    return {"deployments": app.deployer.describe_all(usable)}


@route("GET", "/v1/deployments/{name}")
def get_deployment(app, request, name):
    return app.deployer.describe(app.authorize(request.client, name))


@route("GET", "/v1/deployments/{name}/logs")
def deployment_logs(app, request, name):
    deployment = app.authorize(request.client, name)
    tail = request.query_int("tail", 100, 1, MAX_LOG_TAIL)
    limit = app.config.max_log_bytes
    output = app.deployer.stream_logs(deployment, tail)
    return Response(200, b"", "text/plain; charset=utf-8",
                    (("X-Edd-Max-Log-Bytes", str(limit)),), capped(output, limit))


def capped(chunks, limit):
    """The first `limit` bytes of `chunks`, then a line saying the rest was cut;
    closing this generator closes `chunks`."""
    sent = 0
    try:
        for chunk in chunks:
            if sent + len(chunk) > limit:
                yield chunk[:limit - sent]
                yield ("\n[edd: output cut at max_log_bytes=%d; ask for a smaller tail]\n"
                       % limit).encode()
                return
            sent += len(chunk)
            yield chunk
    finally:
        chunks.close()


@route("POST", "/v1/deployments/{name}/layers")
def layers(app, request, name):
    """What `edd.py push` asks before an upload: how many leading layers of its image
    this deployment already has, and whether this engine loads an archive without
    them. No lock: it only reads, and the upload that follows is checked on its own;
    but a deployment busy right now is a Conflict, as the upload would be."""
    deployment = app.authorize(request.client, name)
    image_id, wanted = parse_layers_request(request.json_body())
    app.check_free(deployment)
    state = app.deployer.describe(deployment)
    layouts = app.deployer.docker.engine.thin_layouts
    return {"have": app.deployer.shared_layers(deployment, wanted), "layers": len(wanted),
            "thin": bool(layouts), "thin_layouts": list(layouts),
            "image_id": state["image_id"], "state": state["state"],
            "running": state["state"] == "running" and state["image_id"] == image_id}


@route("POST", "/v1/deployments/{name}/load", "load")
@route("PUT", "/v1/deployments/{name}/load", "load")
def load(app, request, name):
    deployment = app.authorize(request.client, name)
    with request.holding(deployment, "load"):
        choice = request.query_one("image")
        try:
            loaded, state, ignored = app.deployer.load(deployment, request.body_chunks(),
                                                       choice, app.janitor, request.id,
                                                       request.audit)
        except Forbidden as exc:
            request.audit["refused"] = exc.extra.pop("refused", None)
            raise
    state["loaded"] = dataclasses.asdict(loaded)
    state["ignored_tags"] = ignored
    return state


def _action(action, method="POST", template=None):
    """A route for a Deployer action that holds the lock and replies with the new state."""
    @route(method, template or "/v1/deployments/{name}/" + action, action)
    def act(app, request, name):
        deployment = app.authorize(request.client, name)
        with request.holding(deployment, action):
            return getattr(app.deployer, action)(deployment)
    return act


for _action_name in ("start", "stop", "restart", "rollback"):
    _action(_action_name)
_action("delete", "DELETE", "/v1/deployments/{name}")


@route("GET", "/v1/health")
def health(app, request):
    try:
        engine = app.deployer.docker.detect(timeout=10)
    except DockerError as exc:
        raise ServiceUnavailable("docker is not answering: %s" % exc, edd=__version__)
    return {"status": "ok", "edd": __version__, "docker": engine.version,
            "engine": engine.summary()}


@route("GET", "/metrics")
def metrics(app, request):
    """Every client sees the server-wide series and those of the deployments it may
    use; `metrics_clients` (a monitoring system) see every deployment's."""
    config, client = app.config, request.client
    everything = bool(client.identities & config.metrics_clients)

    def visible(name):
        return everything or name in config.deployments and \
            may_use(config, client, config.deployments[name])
    return Response(200, app.metrics.render(visible).encode(), "text/plain; version=0.0.4")


# ---------------------------------------------------------------------------
# HTTP: the request handler
# ---------------------------------------------------------------------------

def format_fields(**values):
    """key=value pairs for a log line; values with anything but plain ASCII name
    characters are JSON-quoted, so client text (a certificate's CN, a path) can
    neither add fields nor start a line."""
    return " ".join("%s=%s" % (key, value if re.match(r"[A-Za-z0-9_.:/@+,-]+\Z", str(value))
                               else json.dumps(str(value)))
                    for key, value in values.items() if value is not None)


class Request:
    """What a route function sees of one HTTP request."""

    def __init__(self, handler, path, query):
        self.handler = handler
        self.app = handler.app
        self.client = handler.client
        self.id = secrets.token_hex(4)
        self.path = path
        self.query = urllib.parse.parse_qs(query, keep_blank_values=True)
        self.deployment = None      # the name in the path, once routed
        self.audit = {}
        self.refused = False        # a NotAllowed answer: audited as such
        self.body = None
        self.body_done = False

    def query_one(self, key, default=None):
        values = self.query.get(key)
        if not values:
            return default
        if len(values) > 1:
            raise BadRequest("query parameter %r given more than once" % key)
        return values[0]

    def query_int(self, key, default, low, high):
        value = self.query_one(key)
        if value is None:
            return default
        if not re.match(r"[0-9]{1,9}\Z", value) or not low <= int(value) <= high:
            raise BadRequest("%s must be a whole number from %d to %d" % (key, low, high))
        return int(value)

    @contextlib.contextmanager
    def holding(self, deployment, action):
        """Hold the deployment busy, or raise Conflict at once if it already is. While
        any deployment is held, the janitor removes no image (see Janitor)."""
        self.app.hold(deployment, "%s by %s (request %s)" % (action, self.client.name, self.id))
        try:
            with self.app.janitor.busy(self.app.deployer.docker):
                yield
        finally:
            self.app.release(deployment)

    def body_chunks(self, limit=None):
        """Check the upload's framing, answer 100 Continue, and return its chunks."""
        config = self.app.config
        limit = limit or config.max_upload_bytes
        length = body_length(self.handler.headers, limit)
        rfile = PacedReader(self.handler.rfile, self.handler.connection,
                            config.upload_min_bytes_per_second, config.body_timeout_seconds)
        self.body = ChunkedBody(rfile, limit) if length is None else LengthBody(rfile, length)
        self.handler.connection.settimeout(config.body_timeout_seconds)
        self.handler.send_continue()
        return self._chunks(config.body_timeout_seconds)

    def json_body(self):
        """The request's JSON body, decoded; at most MAX_JSON_BODY bytes."""
        try:
            raw = b"".join(bytes(chunk) for chunk in self.body_chunks(MAX_JSON_BODY))
        except PayloadTooLarge:
            raise PayloadTooLarge("a JSON body may have at most %d bytes"
                                  % MAX_JSON_BODY) from None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise BadRequest("the body is not JSON: %s" % exc) from None

    def _chunks(self, timeout):
        # One buffer for the whole upload: memory stays flat however large it is.
        view = memoryview(bytearray(BUFFER_SIZE))
        while True:
            try:
                count = self.body.readinto(view)
            except (ClientGone, OSError) as exc:
                if self.app.stopping.is_set():
                    raise ServiceUnavailable("edd is shutting down; upload aborted") from None
                if isinstance(exc, socket.timeout):
                    raise ClientGone("no data from the client for %g s" % timeout) from None
                raise ClientGone(str(exc)) from None
            if not count:
                self.body_done = True
                return
            yield view[:count]


class _HeadLines:
    """An rfile that remembers the header lines read from it, to check them and to
    see how the head ended."""

    def __init__(self, rfile):
        self.rfile = rfile
        self.lines = []

    def readline(self, size=-1):
        line = self.rfile.readline(size)
        self.lines.append(line)
        return line

    @property
    def last(self):
        return self.lines[-1] if self.lines else None


# RFC 9110's field-name token, a colon right after it, and no obs-fold: anything
# else is a line that parsers disagree about (http.client drops the headers after
# it), so a proxy in front of edd might see another request than edd does.
HEADER_LINE_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r?\n\Z")


def deploy_outcome(status, result):
    """How a load or rollback ended, from its status and answer, for audit and metrics."""
    release = result.get("release") or {}
    if status < 300:
        return "deployed"
    if release and release.get("exit_code") != 0:
        return "release_failed"     # before anything changed
    if result.get("restored"):
        return "restored"
    if result.get("restored") is False:
        return "restore_failed"
    return "refused" if status < 500 else "failed"


class Handler(http.server.BaseHTTPRequestHandler):
    """Parses requests and writes responses; route functions do the rest."""
    protocol_version = "HTTP/1.1"
    # Room for whole TLS records (16 KiB each): the default 8 KiB splits them,
    # half again as many reads per uploaded GiB.
    rbufsize = 1 << 16
    server_version = "edd/" + __version__

    def version_string(self):
        return self.server_version

    linger = False      # set when the connection closes with request bytes unread
    idle = False        # waiting for the next request's head

    def __init__(self, request, client_address, server, trust=None):
        self.trust = trust          # tls_fingerprint() of the context it was made with
        super().__init__(request, client_address, server)

    def setup(self):
        super().setup()
        self.app = self.server.app
        self.client = Client.from_cert(self.connection.getpeercert())
        self.server.track(self, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def handle_one_request(self):
        timeout = self.app.config.header_timeout_seconds
        self.connection.settimeout(timeout)
        self._deadline = Deadline(self.connection, timeout)
        self._expect_continue = False
        self.idle = True
        try:
            if self.trust is not None and self.trust != self.app.tls[1]:
                # Made under TLS files a reload replaced (Server.end_stale).
                self.close_connection = True
                return
            super().handle_one_request()
        finally:
            self.idle = False
            self._deadline.cancel()

    def parse_request(self):
        self.idle = False
        rfile = self.rfile
        self.rfile = head = _HeadLines(rfile)
        try:
            parsed = super().parse_request()
        finally:
            self.rfile = rfile
            self._deadline.cancel()
        if not parsed:
            return False
        if head.last not in (b"\r\n", b"\n"):
            # http.client takes end of file for the end of the headers: a client
            # that hung up, or was cut off by the deadline, must not be obeyed.
            self.close_connection = True
            return False
        if self.request_version == "HTTP/0.9" or len(self.requestline.split(" ")) != 3:
            self.send_error(400, "malformed request line")
            return False
        if not all(HEADER_LINE_RE.match(line) for line in head.lines[:-1]):
            self.send_error(400, "malformed header line")
            return False
        return True

    def handle_expect_100(self):
        # 100 Continue goes out only once the upload is accepted (route, identity,
        # lock, framing): the body of a refused upload is never asked for.
        self._expect_continue = True
        return True

    def send_continue(self):
        if self._expect_continue:
            self._expect_continue = False
            self.send_response_only(100)
            self.end_headers()

    def __getattr__(self, name):
        # http.server calls do_<METHOD> and answers 501 where there is none: every
        # method goes to the route table instead, which answers 404 or 405 in JSON.
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self):
        started = time.monotonic()
        # The target as sent: Python 3.11+ rewrites a leading // in self.path.
        path, _, query = self.requestline.split()[1].partition("?")
        request = Request(self, path, query)
        action, result, response = None, None, None
        try:
            if self.trust is not None and self.trust != self.app.tls[1]:
                self.close_connection = True
                raise Misdirected("edd's TLS files changed since this connection was "
                                  "made; send the request again on a new connection")
            try:
                self.client.check()
            except Forbidden:
                self.close_connection = True
                raise
            function, params, action = match_route(self.command, path)
            request.deployment = params.get("name")
            result = function(self.app, request, **params)
            response = result if isinstance(result, Response) else json_response(200, result)
        except ClientGone as exc:
            log.info("gone %s", format_fields(id=request.id, client=self.client.name,
                                              error=str(exc)))
        except EddError as exc:
            response, result = error_response(exc), exc.extra
            request.refused = isinstance(exc, NotAllowed)
        except Exception:
            log.exception("id=%s unexpected error", request.id)
            response = json_response(500, {"error": "internal error; edd's log has the "
                                                    "details (request %s)" % request.id})
        declared = (self.headers.get_all("Transfer-Encoding") or
                    any(v.strip() != "0" for v in self.headers.get_all("Content-Length", [])))
        if response is None or (declared and not request.body_done):
            self.close_connection = True
            self.linger = response is not None
        if self.trust is not None and self.trust != self.app.tls[1]:
            self.close_connection = True        # a reload changed trust meanwhile
        if response is not None:
            self.send(response)
        self.record(request, action, response, result, time.monotonic() - started)

    def send(self, response):
        # A stream goes out chunked (its length is not known before its end), or
        # delimited by closing the connection for an HTTP/1.0 client.
        chunked = response.stream is not None and self.request_version == "HTTP/1.1"
        if response.stream is not None and not chunked:
            self.close_connection = True
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif response.stream is None:
                self.send_header("Content-Length", str(len(response.body)))
            for key, value in response.headers:
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return                  # the headers GET would send, no body
            if response.stream is None:
                self.wfile.write(response.body)
                return
            for piece in response.stream:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
        finally:
            if response.stream is not None:
                response.stream.close()

    def record(self, request, action, response, result, seconds):
        """The request log line, the audit line and the metrics of one request."""
        status = response.status if response is not None else 499   # client gone
        metrics = self.app.metrics
        metrics.count("edd_requests_total", status=str(status))
        log.info("request %s", format_fields(
            id=request.id, client=self.client.name, method=self.command,
            path=request.path, status=status, duration_ms=int(seconds * 1000)))
        if action not in MUTATING:
            return
        name = request.deployment
        received = request.body.received if request.body else None
        result = result if isinstance(result, dict) else {}
        running = (result.get("deployment") or result).get("image_id")
        deployment = self.app.config.deployments.get(name)
        identity = None
        if deployment is not None and not self.client.refused:
            identity = granting_identity(self.app.config, self.client, deployment)
        outcome = deploy_outcome(status, result) if action in ("load", "rollback") else None
        log.info("audit %s", format_fields(
            id=request.id, time=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            client=self.client.name, identity=identity, serial=self.client.serial,
            deployment=name, action=action, status=status,
            image_id=request.audit.get("image_id"),
            refused=request.audit.get("refused") or ("not-allowed" if request.refused else None),
            running=running, bytes=received,
            restored=result.get("restored"), outcome=outcome,
            duration_ms=int(seconds * 1000)))
        if name not in self.app.config.deployments:
            return
        if received:
            metrics.count("edd_upload_bytes_total", received, deployment=name)
        if outcome:
            metrics.count("edd_deploys_total", deployment=name, action=action,
                          outcome=outcome)
            if outcome == "restored":
                metrics.count("edd_restores_total", deployment=name)
            metrics.observe("edd_deploy_duration_seconds", seconds, deployment=name)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server's own parsing, answered in JSON like the rest."""
        self.close_connection = True
        self.linger = True
        # http.server writes no status line or headers to what it takes for an
        # HTTP/0.9 client, which is also what a request line it cannot parse is.
        self.request_version = "HTTP/1.1"
        text = message or http.HTTPStatus(code).phrase
        body = (json.dumps({"error": text}) + "\n").encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass
        self.app.metrics.count("edd_requests_total", status=str(code))
        log.info("request %s", format_fields(client=self.client.name, status=code, error=text))

    def log_request(self, code="-", size="-"):
        pass    # record() writes one line per request, with more in it

    def log_message(self, format, *args):
        log.debug("http: %s", format_fields(client=self.client.name if hasattr(self, "client")
                                            else None, message=format % args))


# ---------------------------------------------------------------------------
# TLS server
# ---------------------------------------------------------------------------

def _shutdown(sock, how=socket.SHUT_RDWR):
    # socket.socket's method, not SSLSocket's: that one also drops the TLS state
    # under the feet of the thread that is reading from the socket.
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _linger(sock):
    """Half-close, then read and drop what the client still sends, for a short while.

    Closing a socket with unread bytes in it makes the kernel send RST, which can
    destroy the answer before the client has read it (RFC 9112, section 9.6).
    """
    _shutdown(sock, socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    try:
        while drained < LINGER_BYTES and time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            # socket.socket's recv: the raw bytes, no TLS work to throw them away.
            data = socket.socket.recv(sock, 65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass


class Watcher:
    """One thread that calls functions when they fall due: every deadline in edd.

    A timer thread per connection would make each silent client cost a thread,
    and threads (pids, under systemd's TasksMax) are what an attacker would spend.
    """

    def __init__(self):
        self._due = []                  # heap of [when, sequence, function, args]
        self._sequence = 0
        self._wake = threading.Condition()
        self._thread = None

    def call_later(self, seconds, function, *args):
        """Call function(*args) in `seconds`; return a token for cancel()."""
        with self._wake:
            self._sequence += 1
            entry = [time.monotonic() + seconds, self._sequence, function, args]
            heapq.heappush(self._due, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watcher",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()
            return entry

    def cancel(self, entry):
        with self._wake:
            entry[2] = None             # left in the heap, skipped when it falls due

    def _run(self):
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due
                                    else None)
                _, _, function, args = heapq.heappop(self._due)
            if function is not None:
                try:
                    function(*args)
                except Exception:
                    log.exception("watcher: %r failed", function)


WATCHER = Watcher()


class Deadline:
    """Shut a connection down unless cancel() comes within `seconds`.

    Socket timeouts bound each read; a deadline bounds a whole phase (request
    head, upload) against clients that trickle in a byte at a time.
    """

    def __init__(self, sock, seconds):
        self._entry = WATCHER.call_later(seconds, _shutdown, sock)

    def cancel(self):
        WATCHER.cancel(self._entry)


HANDSHAKE_SUMMARY_SECONDS = 60


class Handshakes:
    """Every TLS handshake in progress, driven by one thread on non-blocking sockets.

    A connection costs a worker thread only once its client has proved a
    certificate. At most `max_handshakes` connections wait here (handshaking, or
    handshaken and waiting for one of `max_connections` workers); a newcomer beyond
    that pushes out the oldest handshake still in progress, so silent connections
    cannot lock real clients out, they only age out faster. Failed handshakes are
    logged at DEBUG, with an INFO count once a minute.
    """

    def __init__(self, server):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.pending = collections.OrderedDict()    # tls socket -> (address, due, trust)
        self.ready = collections.deque()            # (tls socket, address, trust)
        self._inbox = collections.deque()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self.selector.register(self._wake_read, selectors.EVENT_READ)
        self._closed = False
        self.failures, self._last_failure = 0, ""
        self._summary_at = time.monotonic() + HANDSHAKE_SUMMARY_SECONDS
        self._thread = threading.Thread(target=self._run, name="handshakes", daemon=True)
        self._thread.start()

    def add(self, sock, address):
        """Take a newly accepted TCP connection (called from the accepting thread)."""
        self._inbox.append((sock, address))
        self.wake()

    def wake(self):
        try:
            self._wake_write.send(b"\0")
        except OSError:
            pass            # the pipe is full: the loop is awake anyway

    def close(self):
        self._closed = True
        self.wake()

    def _run(self):
        while not self._closed:
            try:
                self._turn()
            except Exception:
                # This thread is the only way in: it must outlive any one surprise.
                log.exception("handshakes: unexpected error")
                time.sleep(0.1)
        for tls in list(self.pending) + [entry[0] for entry in self.ready]:
            tls.close()

    def _turn(self):
        """Wait for sockets and the clock, then move every connection on that can."""
        now = time.monotonic()
        due = min([entry[1] for entry in self.pending.values()] + [now + 1.0])
        for key, _ in self.selector.select(max(due - now, 0)):
            if key.fileobj is self._wake_read:
                try:
                    while self._wake_read.recv(4096):
                        pass
                except OSError:
                    pass
            elif key.fileobj in self.pending:
                self._step(key.fileobj)
        while self._inbox:
            self._start(*self._inbox.popleft())
        self._expire()
        self._hand_over()
        self._summarize()

    def _start(self, sock, address):
        context, trust = self.server.app.tls
        if len(self.pending) + len(self.ready) >= self.server.app.config.max_handshakes:
            if not self.pending:
                log.debug("connection from %s closed: %d connections are waiting for a "
                          "worker", address[0], len(self.ready))
                sock.close()
                return
            oldest = next(iter(self.pending))
            self._fail(oldest, "pushed out by newer connections (max_handshakes)")
        try:
            # Without TCP_NODELAY a reply written in two pieces waits for the
            # client's delayed ACK: 40 ms on Linux, more than the whole request needs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            log.debug("connection from %s failed: %s", address[0], exc)
            sock.close()
            return
        timeout = self.server.app.config.handshake_timeout_seconds
        self.pending[tls] = (address, time.monotonic() + timeout, trust)
        self._step(tls)

    def _step(self, tls):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return self._watch(tls, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self._watch(tls, selectors.EVENT_WRITE)
        except (OSError, ValueError) as exc:
            return self._fail(tls, exc)
        except Exception as exc:
            log.exception("tls handshake: unexpected error")
            return self._fail(tls, exc)
        address, _, trust = self._forget(tls)
        tls.setblocking(True)
        self.ready.append((tls, address, trust))

    def _watch(self, tls, events):
        try:
            try:
                self.selector.modify(tls, events)
            except KeyError:
                self.selector.register(tls, events)
        except (OSError, ValueError) as exc:
            self._fail(tls, exc)

    def _forget(self, tls):
        try:
            self.selector.unregister(tls)
        except (KeyError, ValueError):
            pass
        return self.pending.pop(tls)

    def _fail(self, tls, reason):
        address = self._forget(tls)[0]
        tls.close()
        self.failures += 1
        self._last_failure = format_fields(peer=address[0], error=str(reason))
        log.debug("tls handshake failed: %s", self._last_failure)

    def _expire(self):
        now = time.monotonic()
        for tls, (address, due, _) in list(self.pending.items()):
            if now >= due:
                self._fail(tls, "no handshake within handshake_timeout_seconds")

    def _hand_over(self):
        while self.ready and self.server.take_slot():
            tls, address, trust = self.ready.popleft()
            threading.Thread(target=self.server.serve_connection, args=(tls, address, trust),
                             name="connection", daemon=True).start()

    def _summarize(self):
        now = time.monotonic()
        if now < self._summary_at:
            return
        if self.failures:
            log.info("tls: %d handshakes failed in the last %d s; the last: %s",
                     self.failures, HANDSHAKE_SUMMARY_SECONDS, self._last_failure)
        self.failures = 0
        self._summary_at = now + HANDSHAKE_SUMMARY_SECONDS


class Server(http.server.ThreadingHTTPServer):
    """Accepts plain TCP; Handshakes does TLS, then a worker thread serves requests.

    At most `max_connections` workers run; connections past that wait, handshaken,
    in Handshakes until one ends.
    """
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, app):
        self.app = app
        self._handlers = set()
        self._handlers_lock = threading.Lock()
        self._workers = 0
        host, port = app.config.listen
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.handshakes = Handshakes(self)

    def process_request(self, request, client_address):
        self.handshakes.add(request, client_address)

    def take_slot(self):
        with self._handlers_lock:
            if self._workers >= self.app.config.max_connections:
                return False
            self._workers += 1
            return True

    def serve_connection(self, tls, client_address, trust):
        """A worker thread: serve requests on one handshaken connection until it ends."""
        try:
            tls.settimeout(self.app.config.header_timeout_seconds)
            handler = self.RequestHandlerClass(tls, client_address, self, trust)
            if handler.linger:
                _linger(tls)
        except OSError as exc:
            log.debug("connection with %s ended: %s", client_address[0], exc)
        except Exception:
            self.handle_error(tls, client_address)
        finally:
            tls.close()
            with self._handlers_lock:
                self._workers -= 1
            self.handshakes.wake()

    def server_close(self):
        super().server_close()
        self.handshakes.close()

    def end_stale(self):
        """After client_ca or the certificates changed: close idle connections made
        under the old trust; busy ones close after their answer (Handler.dispatch)."""
        trust = self.app.tls[1]
        with self._handlers_lock:
            stale = [h for h in self._handlers if h.trust != trust and h.idle]
        for handler in stale:
            _shutdown(handler.connection)
        return len(stale)

    def handle_error(self, request, client_address):
        log.debug("connection with %s failed", client_address[0], exc_info=True)

    def track(self, handler, active):
        with self._handlers_lock:
            (self._handlers.add if active else self._handlers.discard)(handler)

    def stop_reading(self):
        """Shut the read side of every open connection: uploads abort, idle ones close."""
        with self._handlers_lock:
            for handler in self._handlers:
                _shutdown(handler.connection, socket.SHUT_RD)

    def wait_idle(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self._handlers_lock:
                if not self._handlers:
                    return True
            time.sleep(0.1)
        return False


# ---------------------------------------------------------------------------
# systemd, signals, logging
# ---------------------------------------------------------------------------

STOP_GRACE_SECONDS = 75        # SIGTERM's wait for requests other than changes


def sd_notify(message):
    """Tell systemd `message` (e.g. READY=1); do nothing when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]        # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False


def start_watchdog():
    """Send WATCHDOG=1 at half the interval systemd asks for, if it asks."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None

    def ping():
        while True:
            time.sleep(int(usec) / 2e6)
            sd_notify("WATCHDOG=1")
    thread = threading.Thread(target=ping, name="watchdog", daemon=True)
    thread.start()
    return thread


class JournalFormatter(logging.Formatter):
    """Prefixes journald reads as the priority; journald adds the time itself."""
    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                  logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        return "<%d>%s" % (self.PRIORITIES.get(record.levelno, 6), super().format(record))


CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class EscapeControls(logging.Filter):
    """Last line of defence for text from clients and docker in log messages: a
    newline would start a line of its choosing (an `audit` line, a journald `<2>`
    priority). Tracebacks are formatted apart and keep their lines."""

    def filter(self, record):
        message = record.getMessage()
        escaped = CONTROL_RE.sub(lambda m: "\\x%02x" % ord(m.group()), message)
        if escaped != message:
            record.msg, record.args = escaped, ()
        return True


def setup_logging(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeControls())
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def serve(app, server):
    """Serve until SIGTERM or SIGINT, reloading on SIGHUP; return the exit status."""
    reload_lock = threading.Lock()

    def reload():
        with reload_lock:
            sd_notify("RELOADING=1")
            if app.reload() and app.trust_changed:
                server.end_stale()
            sd_notify("READY=1")

    def on_signal(signum, frame):
        if signum == signal.SIGHUP:
            threading.Thread(target=reload, name="reload", daemon=True).start()
            return
        log.info("%s: shutting down", signal.Signals(signum).name)
        sd_notify("STOPPING=1")
        # shutdown() waits for serve_forever(), which runs in this very thread.
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    start_watchdog()
    host, port = server.server_address[:2]
    log.info("edd %s listening on https://%s:%d", __version__,
             "[%s]" % host if ":" in host else host, port)
    sd_notify("READY=1\nSTATUS=listening on port %d" % port)
    server.serve_forever()
    app.stopping.set()
    server.server_close()
    server.stop_reading()
    # A swap is waited for however long its gate (systemd's TimeoutStopSec bounds
    # it): cut short, it would leave an ungated container running.
    while not server.wait_idle(STOP_GRACE_SECONDS):
        if not app.busy():
            log.warning("exiting with requests still running")
            break
        log.info("waiting for %s", "; ".join(app.busy()))
    log.info("stopped")
    return 0


# ---------------------------------------------------------------------------
# Client: edd.py push IMAGE URL
# ---------------------------------------------------------------------------

DEFAULT_PORT = 8866
CONTINUE_SECONDS = 2           # a server silent this long after Expect gets the body anyway
CONNECT_SECONDS = 30
SEND_SECONDS = 300             # a send that makes no progress this long is a dead host
ANSWER_SECONDS = 3600          # the host loads, swaps and waits for the gate meanwhile
REDRAW_SECONDS = 0.5


class PushError(Exception):
    """The push stops here. exit_status 2: nothing was attempted on the host;
    1: an upload was sent and did not deploy. `answer` is the host's JSON, if any."""

    def __init__(self, message, exit_status=2, answer=None):
        super().__init__(message)
        self.exit_status = exit_status
        self.answer = answer or {}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a push goes: https://HOST:PORT/v1/deployments/NAME."""
    host: str
    port: int
    deployment: str

    def path(self, action=None):
        return "/v1/deployments/%s" % self.deployment + ("/" + action if action else "")

    def __str__(self):
        return "%s:%d/%s" % (self.host, self.port, self.deployment)


def parse_target(url):
    """The Target of `url`; PushError if it is not https://HOST[:PORT]/v1/deployments/NAME."""
    parts = urllib.parse.urlsplit(url)
    match = re.match(r"/v1/(?:deployments/)?([a-z0-9._-]+)/?\Z", parts.path)
    try:
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError:      # not a number, or over 65535
        port = None
    if parts.scheme != "https" or not parts.hostname or not match or not port \
            or parts.query or parts.fragment:
        raise PushError("URL must look like https://HOST:PORT/v1/deployments/NAME, not %r"
                        % url)
    return Target(parts.hostname, port, match.group(1))


@dataclasses.dataclass(frozen=True)
class LocalImage:
    ref: str
    id: str
    layers: tuple        # diff IDs, base first
    size: int            # about the size of its `docker save` archive


def local_image(docker, ref):
    """The client's own image `ref`, as its engine describes it."""
    image = docker.inspect("image", [ref]).get(ref)
    if image is None:
        raise PushError("no image %r here (docker image ls lists the images)" % ref)
    return LocalImage(ref, image["Id"], tuple((image.get("RootFS") or {}).get("Layers") or ()),
                      image.get("Size") or 0)


class Meter:
    """What a long push shows: on a terminal, one line on stderr redrawn twice a
    second (what is going on, bytes, rate, time left); otherwise one line at the end.
    A rollout's meters name their target (`label`); only one at a time may redraw."""

    def __init__(self, stream, label=None, redraw=True):
        self.stream = stream
        self.tty = redraw and stream.isatty()
        self.prefix = "edd push: " + ("%s: " % label if label else "")
        self.sent = 0               # archive bytes sent, every attempt counted
        self.send_seconds = 0.0
        self.activity, self.total, self.count = "starting", None, 0
        self.started = self.phase_started = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if self.tty:
            self._thread = threading.Thread(target=self._redraw, name="progress", daemon=True)
            self._thread.start()

    def phase(self, activity, total=None):
        """Start showing `activity`; `total` is the bytes it will count, if known."""
        now = time.monotonic()
        if self.activity == "sending":
            self.send_seconds += now - self.phase_started
        self.activity, self.total, self.count, self.phase_started = activity, total, 0, now

    def add(self, count):
        """`count` more bytes done in this phase (and sent, if it is "sending")."""
        self.count += count
        if self.activity == "sending":
            self.sent += count

    def say(self, text):
        """A line of its own, above the progress line."""
        self.stream.write(("\r\033[K" if self.tty else "") + "%s%s\n" % (self.prefix, text))
        self.stream.flush()

    def line(self):
        elapsed = max(time.monotonic() - self.phase_started, 1e-6)
        if not self.count:
            return "%s%s (%d s)" % (self.prefix, self.activity, elapsed)
        rate = self.count / elapsed
        text = "%s%s %s" % (self.prefix, self.activity, _size(self.count))
        if self.total:
            text += " of %s" % _size(self.total)
        text += ", %s/s" % _size(rate)
        if self.total and self.total > self.count:
            text += ", %d s left" % ((self.total - self.count) / rate)
        return text

    def _redraw(self):
        while not self._stop.wait(REDRAW_SECONDS):
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()

    def close(self):
        """Stop redrawing; print the one summary line, if anything was sent."""
        self.phase("done")
        self._stop.set()
        if self._thread:
            self._thread.join()
            self.stream.write("\r\033[K")
        if self.sent:
            self.stream.write("%ssent %s in %.1f s (%s/s); %.1f s in all\n" % (
                self.prefix, _size(self.sent), self.send_seconds,
                _size(self.sent / max(self.send_seconds, 1e-6)),
                time.monotonic() - self.started))
        self.stream.flush()


def _size(count):
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return "%.0f %s" % (count, unit) if unit == "B" else "%.1f %s" % (count, unit)
        count /= 1024.0
    return "%.2f GiB" % count


class _BufferedSocket:
    """Hands http.client.HTTPResponse the reader that already holds the answer's start."""

    def __init__(self, reader):
        self.reader = reader

    def makefile(self, mode):
        return self.reader


class Host:
    """An edd server as the client sees it: one mTLS connection per request."""

    def __init__(self, target, context):
        self.target = target
        self.context = context

    def _connect(self):
        where = "%s:%d" % (self.target.host, self.target.port)
        try:
            raw = socket.create_connection((self.target.host, self.target.port),
                                           timeout=CONNECT_SECONDS)
        except OSError as exc:
            raise PushError("cannot connect to %s: %s" % (where, exc.strerror or exc)) from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.target.host)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            raw.close()
            raise PushError("TLS handshake with %s failed: %s" % (where, _tls_reason(exc))
                            ) from None
        sock.settimeout(SEND_SECONDS)
        return sock

    def _head(self, method, action, headers):
        lines = ["%s %s HTTP/1.1" % (method, self.target.path(action)),
                 "Host: %s:%d" % (self.target.host, self.target.port),
                 "User-Agent: edd/%s" % __version__, "Connection: close"]
        lines += ["%s: %s" % header for header in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def request(self, method, action=None, body=b"", headers=(), timeout=SEND_SECONDS):
        """(status, JSON answer) of a request with a small `body`; PushError (2) if
        there is no answer. `timeout` bounds the wait for it."""
        sock = self._connect()
        with sock, sock.makefile("rb") as reader:
            try:
                sock.sendall(self._head(method, action, list(headers) + [
                    ("Content-Length", str(len(body)))]) + body)
                sock.settimeout(timeout)
                return _read_answer(reader)
            except (OSError, http.client.HTTPException) as exc:
                raise PushError("no answer from the host: %s" % _tls_reason(exc)) from None

    def layers(self, image):
        """The host's answer to /layers for `image`; PushError (2) unless it is 200."""
        body = json.dumps({"image_id": image.id, "layers": list(image.layers)}).encode()
        status, answer = self.request("POST", "layers", body,
                                      [("Content-Type", "application/json")])
        if status != 200:
            raise PushError(_error_of(status, answer), answer=answer)
        return answer

    def load(self, chunks, meter):
        """Upload `chunks` to /load, chunked, after the host says 100 Continue.

        Return (status, answer, sent): `sent` is False when the host answered before
        taking the body (refused: busy, forbidden), so nothing was attempted."""
        sock = self._connect()
        with sock, sock.makefile("rb") as reader:
            try:
                sock.sendall(self._head("POST", "load", [
                    ("Content-Type", "application/x-tar"), ("Transfer-Encoding", "chunked"),
                    ("Expect", "100-continue")]))
                if not _wait_continue(sock, reader):
                    return _read_answer(reader) + (False,)
                meter.phase("sending", meter.total)
                try:
                    for chunk in chunks:
                        if not len(chunk):
                            continue        # an empty chunk would end the body
                        sock.sendall(b"%x\r\n" % len(chunk))
                        sock.sendall(chunk)
                        sock.sendall(b"\r\n")
                        meter.add(len(chunk))
                    sock.sendall(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass        # the host stopped reading: its answer says why
                meter.phase("the host loads and deploys")
                sock.settimeout(ANSWER_SECONDS)
                return _read_answer(reader) + (True,)
            except (OSError, http.client.HTTPException) as exc:
                raise PushError("the connection to the host failed during the upload: %s; "
                                "GET %s shows what runs" % (exc, self.target.path()),
                                exit_status=1) from None


def _tls_reason(exc):
    """What went wrong, in words. With TLS 1.3 a host that refuses the client's
    certificate says so only after the handshake: as an alert, or by closing."""
    reason = str(getattr(exc, "verify_message", None) or exc)
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
        reason += "; does the host accept this client certificate?"
    return reason


def _wait_continue(sock, reader):
    """After a request head with Expect: 100-continue: True when the host wants the
    body (it said 100 Continue, or nothing for CONTINUE_SECONDS), False when its
    final answer came instead."""
    if not sock.pending() and not select.select([sock], [], [], CONTINUE_SECONDS)[0]:
        return True
    if not re.match(rb"HTTP/1\.[01] 100", reader.peek(12)[:12]):
        return False
    while reader.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
        pass
    return True


def _read_answer(reader):
    """(status, JSON answer) of the response waiting in `reader`."""
    reply = http.client.HTTPResponse(_BufferedSocket(reader))
    reply.begin()
    raw = reply.read()
    try:
        answer = json.loads(raw.decode("utf-8"))
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        answer = {"error": "HTTP %d: %s" % (reply.status, raw[:200].decode("utf-8", "replace")
                                            .strip() or reply.reason)}
    return reply.status, answer


def _error_of(status, answer):
    return "the host answered %d: %s" % (status, answer.get("error") or "no reason given")


def layer_gone(status, answer):
    """Whether a thin upload failed because a layer the host said it had is gone:
    docker could not find it, or edd refused it as not this deployment's own."""
    text = str(answer.get("error", "")).lower()
    return status in (400, 403) and not answer.get("restored") and "layer" in text


# -- the archive: docker save, spooled when layers are left out --------------

def saved_chunks(docker, ref):
    """`docker save ref` streamed straight into the upload, BUFFER_SIZE at a time. If
    save fails, the upload is cut off before its last chunk, so the host loads nothing
    and changes nothing: PushError with exit status 2."""
    process, finish = docker.start_save(ref)
    buffer = memoryview(bytearray(BUFFER_SIZE))
    try:
        while True:
            count = process.stdout.readinto(buffer)
            if not count:
                break
            yield buffer[:count]
        returncode = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    errors = finish()
    if returncode != 0:
        raise PushError("docker save %s failed: %s" % (ref, _docker_message(errors.encode())))


def spool(docker, ref, meter):
    """`docker save ref` in an anonymous temporary file (the system's temp folder: it
    needs the image's size free there, and is gone once closed), read on the way by
    the archive filter. Return (the file, its Archive)."""
    # Unbuffered: the chunks are large already, and a copy per GiB costs 0.1 s.
    spooled = tempfile.TemporaryFile(prefix="edd-push-", buffering=0)
    meter.phase("saving %s to %s:" % (ref, tempfile.gettempdir()))

    def keep(chunk):
        _write_all(spooled.fileno(), chunk)
        meter.add(len(chunk))
    try:
        archive = index_archive(saved_chunks(docker, ref), keep)
        return spooled, archive
    except OSError as exc:
        spooled.close()
        raise PushError("cannot spool `docker save %s` in %s: %s"
                        % (ref, tempfile.gettempdir(), exc.strerror or exc)) from None
    except BaseException:
        spooled.close()
        raise


class _ArchiveIndex(ArchiveFilter):
    """The archive filter reading only where members are and what the metadata files
    say: it passes nothing on and hashes nothing, which halves what spooling costs.
    LEAD: an `index_only` flag of ArchiveFilter would say the same without this."""

    def _mode_for(self, member):
        mode = super()._mode_for(member)
        return "drop" if mode == "pass" else mode


def index_archive(chunks, sink=None):
    """The Archive (members, metadata files) of the tar stream `chunks`, as the
    archive filter reads it; every chunk is also handed to sink(), if given."""
    archive = Archive()
    reader = _ArchiveIndex(archive, strip=False)
    for chunk in chunks:
        if sink:
            sink(chunk)
        reader.feed(chunk)
    reader.close()
    return archive


def file_chunks(file, lock=None):
    """The file from its start, BUFFER_SIZE at a time. Readers that share the file
    (a rollout's parallel uploads) share `lock`: each read seeks to its own place."""
    offset = 0
    while True:
        with lock or contextlib.nullcontext():
            file.seek(offset)
            chunk = file.read(BUFFER_SIZE)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def thin_plan(file, archive, image, have, layouts):
    """The archive members a thin upload leaves out (a set), or the reason it cannot
    be thin: the host's engine does not load this layout without layers, or the
    archive's layers are not the ones the host was asked about."""
    layout = "oci" if "oci-layout" in archive.members else "legacy"
    if layout not in layouts:
        return "the host's engine loads only %s archives without layers, this is %s" % (
            " or ".join(layouts) or "no", layout)
    entries = read_manifest(archive)
    config = resolve_member(archive, entries[0]["Config"])
    if len(entries) != 1 or config is None:
        return "the saved archive is not one image"
    layers = layer_diff_ids(entries[0], read_member(file, config))
    if tuple(diff_id for _, diff_id in layers[:have]) != image.layers[:have]:
        return "the saved archive's layers differ from `docker image inspect`"

    def members(paths):
        # A layer may be a link to another's file (legacy layout, a repeated layer):
        # leave out neither the link nor its target while a kept layer needs them.
        found = {member_name(path) for path in paths}
        return found | {m.name for m in map(lambda p: resolve_member(archive, p), paths) if m}
    return members([p for p, _ in layers[:have]]) - members([p for p, _ in layers[have:]])


# -- the push ------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    status: int
    answer: dict
    layers_sent: int
    layers_skipped: int
    fallback: str = None


def push(options, docker, meter):
    """Deploy the local image options.image to options.url; return the Outcome.
    Raise PushError when it cannot go on (its exit_status says whether anything was
    attempted)."""
    host = Host(parse_target(options.url), client_context(options))
    image = local_image(docker, options.image)
    meter.phase("asking %s which layers it has" % host.target.host)
    with SavedImage(docker, image) as saved:
        return deliver(host, saved, host.layers(image), options, meter)


def client_context(options):
    return tls_context(ssl.PROTOCOL_TLS_CLIENT, options.cert, options.key,
                       options.cacert, "--cert/--key", "--cacert")


class SavedImage:
    """`docker save` of the image, run at most once per push. A push to one host
    that sends the whole image streams it straight from docker; anything else
    (a thin upload, several hosts) spools it once and reads that file again."""

    def __init__(self, docker, image, keep=False):
        self.docker, self.image, self.keep = docker, image, keep
        self.file = self.archive = None
        self._lock = threading.Lock()       # parallel pushes share one spool

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.file:
            self.file.close()

    def spooled(self, meter):
        """(the spooled file, its Archive), saving the image the first time."""
        with self._lock:
            if self.file is None:
                self.file, self.archive = spool(self.docker, self.image.ref, meter)
        return self.file, self.archive

    def whole(self, meter):
        """The archive's chunks, everything in it."""
        if self.file is None and not self.keep:
            return saved_chunks(self.docker, self.image.ref)
        return file_chunks(self.spooled(meter)[0], self._lock)

    def plan(self, have, layouts, meter):
        """thin_plan() of the spooled archive for a host that has `have` layers."""
        file, archive = self.spooled(meter)
        with self._lock:                    # read_member() moves the file's position too
            return thin_plan(file, archive, self.image, have, layouts)

    def size(self):
        return os.fstat(self.file.fileno()).st_size if self.file else self.image.size


def deliver(host, saved, answer, options, meter):
    """The upload to `host` after its /layers `answer`: nothing if it already runs
    the image (unless --force), else the layers it lacks, else everything."""
    count = len(saved.image.layers)
    if answer.get("running") and not options.force:
        return Outcome(200, dict(answer, already_running=True), 0, count)
    have = 0 if options.full else answer.get("have", 0)
    if have and not answer.get("thin"):
        return _upload(host, saved.whole(meter), meter, count, 0,
                       "the host's engine does not load archives without layers",
                       saved.size())
    if not have:
        return _upload(host, saved.whole(meter), meter, count, 0, total=saved.size())
    plan = saved.plan(have, answer.get("thin_layouts", ()), meter)
    if isinstance(plan, str):
        return _upload(host, saved.whole(meter), meter, count, 0, plan, saved.size())
    thin = filter_archive(saved.whole(meter), Archive(), plan, strip=False)
    outcome = _upload(host, thin, meter, count - have, have)
    if layer_gone(outcome.status, outcome.answer):
        reason = "the thin upload failed: %s" % outcome.answer.get("error")
        return _upload(host, saved.whole(meter), meter, count, 0, reason, saved.size())
    return outcome


def _upload(host, chunks, meter, layers_sent, layers_skipped, fallback=None, total=None):
    if fallback:
        meter.say("sending the whole image, as %s" % fallback)
    meter.phase("waiting for the host to accept the upload", total)
    status, answer, sent = host.load(chunks, meter)
    if not sent:
        raise PushError(_error_of(status, answer), answer=answer)
    return Outcome(status, answer, layers_sent, layers_skipped, fallback)


def summary(options, outcome):
    """The short human account of a successful push, for stdout."""
    answer = outcome.answer
    name = answer.get("name") or parse_target(options.url).deployment
    image_id = (answer.get("image_id") or "?")[:19]
    if answer.get("already_running"):
        return "%s already runs %s (%s); nothing sent (--force redeploys)" % (
            name, options.image, image_id)
    return "%s now runs %s (%s), %s; %d layer%s sent, %d the host had" % (
        name, options.image, image_id, answer.get("state"), outcome.layers_sent,
        "" if outcome.layers_sent == 1 else "s", outcome.layers_skipped)


class _PushArguments(argparse.ArgumentParser):
    def error(self, message):
        raise PushError("%s (edd.py push --help shows the usage)" % message)


def push_arguments(argv):
    parser = _PushArguments(
        prog="edd.py push",
        description="Deploy a local image to edd hosts, sending each only the layers "
                    "its deployment does not already have. Several URLs (or --targets) "
                    "make a rollout: every target is asked first and nothing changes "
                    "unless all answer; then one at a time (--parallel N), and a failed "
                    "deploy rolls the targets already updated back to what they ran.",
        epilog="Exit status: 0 deployed (or already running), 1 a deploy failed (each "
               "host keeps or restores its old container; a rollout says whether the "
               "others are back on the old version or left mixed), 2 nothing was changed.")
    parser.add_argument("image", help="a local image: repo:tag or id")
    parser.add_argument("urls", nargs="*", metavar="URL",
                        help="https://HOST:PORT/v1/deployments/NAME, in rollout order")
    parser.add_argument("--targets", metavar="FILE",
                        help="more URLs, one a line (# starts a comment)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="update up to N targets at once (default 1)")
    parser.add_argument("--no-rollback", action="store_true",
                        help="after a failed deploy, leave the targets already updated "
                             "on the new image")
    parser.add_argument("--cert", default=os.environ.get("EDD_CERT"),
                        help="client certificate, PEM (default $EDD_CERT)")
    parser.add_argument("--key", default=os.environ.get("EDD_KEY"),
                        help="its key, PEM (default $EDD_KEY; none: in the --cert file)")
    parser.add_argument("--cacert", default=os.environ.get("EDD_CACERT"),
                        help="CA that signed the host's certificate (default $EDD_CACERT; "
                             "none: the system's CAs)")
    parser.add_argument("--docker", default=os.environ.get("EDD_DOCKER", "docker"),
                        help="the local engine's CLI, docker or podman (default "
                             "$EDD_DOCKER, else docker)")
    parser.add_argument("--full", action="store_true",
                        help="send every layer, whatever the host has")
    parser.add_argument("--force", action="store_true",
                        help="deploy even if the host already runs this image")
    parser.add_argument("--json", action="store_true",
                        help="print the host's answer as JSON, with bytes_sent, "
                             "layers_sent and layers_skipped (a rollout: its report, "
                             "an array with one object per target)")
    # Intermixed: options may come between the URLs, as in `push IMG URL --json URL`.
    options = parser.parse_intermixed_args(argv)
    if options.targets:
        options.urls += read_targets(options.targets)
    if not options.urls:
        raise PushError("the following arguments are required: URL (or --targets FILE)")
    if options.parallel < 1:
        raise PushError("--parallel must be 1 or more")
    options.rollout = len(options.urls) > 1 or bool(options.targets)
    options.url = options.urls[0]
    if not options.cert:
        raise PushError("no client certificate: give --cert FILE or set EDD_CERT")
    return options


def read_targets(path):
    """The URLs listed in the file at `path`: one a line, `#` to the line's end a comment."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PushError("--targets %s: cannot read: %s"
                        % (path, getattr(exc, "strerror", None) or exc)) from None
    return [line.split("#", 1)[0].strip() for line in lines
            if line.split("#", 1)[0].strip()]


def push_main(argv, out=None, err=None, docker=None):
    """`edd.py push`: return the exit status (0, 1 or 2)."""
    out, err = out or sys.stdout, err or sys.stderr
    meter = None
    options = None
    try:
        options = push_arguments(argv)
        docker = docker or Docker(options.docker)
        if options.rollout:
            return rollout_main(options, out, err, docker)
        meter = Meter(err)
        outcome = push(options, docker, meter)
        status = 0 if outcome.status == 200 else 1
        message = None if status == 0 else _error_of(outcome.status, outcome.answer)
        answer = dict(outcome.answer, bytes_sent=meter.sent, layers_sent=outcome.layers_sent,
                      layers_skipped=outcome.layers_skipped)
        if outcome.fallback:
            answer["fallback"] = outcome.fallback
    except (PushError, ConfigError, EddError) as exc:
        status = getattr(exc, "exit_status", 2)
        message = str(exc)
        answer = dict(getattr(exc, "answer", None) or {"error": message})
        if meter:
            answer.update(bytes_sent=meter.sent)
    except KeyboardInterrupt:
        status, message, answer = 1 if meter and meter.sent else 2, "interrupted", {}
    if meter:
        meter.close()
    if options is not None and options.json:
        out.write(json_text(answer))
    elif status == 0:
        out.write(summary(options, outcome) + "\n")
    if message:
        print("edd push: error: %s" % message, file=err)
        for line in (answer.get("log") or "").splitlines():
            print("  | " + line, file=err)
    return status


# -- many hosts: a rollout -------------------------------------------------------
#
# A rollout is the one-host push repeated, with three rules on top: every target
# is asked (/layers) before any changes, and one refusal changes nothing; the
# next target starts only after the last one's gate passed; and after a failed
# deploy each target this push updated is rolled back through its own gate.
# The hosts share no state: what the client reports is what each host answered.

POLL_TARGETS_SECONDS = 0.2     # how often a rollout looks for a finished target or a signal


@dataclasses.dataclass(eq=False)
class Step:
    """One target of a rollout, and what happened to it. `before` and `after` are the
    image ids the host reported (None: no container); `after` is "unknown" when the
    host could not be asked."""
    url: str
    host: Host
    refused: str = None         # why the preflight failed
    before: str = None
    before_state: str = None
    after: str = None
    outcome: str = "not attempted"
    updated: bool = False       # this push changed what it runs
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str = None
    log: str = None

    def report(self):
        fields = {"target": self.url, "before": self.before, "after": self.after,
                  "outcome": self.outcome, "bytes_sent": self.bytes_sent,
                  "seconds": round(self.seconds, 1)}
        if self.refused:
            fields["preflight"] = self.refused
        if self.error:
            fields["error"] = self.error
        return fields


def rollout_steps(options):
    """The rollout's Steps, one per URL, each with its Host; PushError if a URL is
    malformed or named twice (the second push would undo the first's rollback)."""
    targets = [parse_target(url) for url in options.urls]
    repeated = {str(t) for t in targets if targets.count(t) > 1}
    if repeated:
        raise PushError("a target is named twice: %s" % ", ".join(sorted(repeated)))
    context = client_context(options)
    return [Step(url, Host(target, context)) for url, target in zip(options.urls, targets)]


def preflight(steps, image):
    """Ask every target's /layers at once; record what each runs, or why it refused
    (unreachable, TLS, not allowed, no such deployment, engine down, busy)."""
    def ask(step):
        try:
            answer = step.host.layers(image)
        except PushError as exc:
            step.refused = str(exc)
            return
        step.before = step.after = answer.get("image_id")
        step.before_state = answer.get("state")
    _in_threads(ask, steps)


def _in_threads(function, items):
    threads = [threading.Thread(target=function, args=(item,), daemon=True) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def observe(step):
    """Ask the host what it runs now (after a failure, the answer we have may be
    missing or stale); set step.after to that image id, or "unknown"."""
    try:
        status, answer = step.host.request("GET")
    except PushError:
        status, answer = None, {}
    step.after = answer.get("image_id") if status == 200 else "unknown"


def deploy_step(step, saved, options, err):
    """Push to one target. The /layers answer is asked again, right before the
    upload: it gives this host's own `have`, and a target that another client
    changed since the preflight is left alone (a failure: its rollback could
    not be exact)."""
    started = time.monotonic()
    meter = Meter(err, str(step.host.target), redraw=options.parallel == 1)
    try:
        answer = step.host.layers(saved.image)
        if answer.get("image_id") != step.before:
            step.outcome, step.after = "failed", answer.get("image_id")
            step.error = "it changed since the preflight (it ran %s, now %s); not pushed" % (
                _short(step.before), _short(step.after))
            return
        outcome = deliver(step.host, saved, answer, options, meter)
        answer = outcome.answer
        if outcome.status == 200:
            step.outcome = "already running" if answer.get("already_running") else "deployed"
            step.after = answer.get("image_id")
        else:
            step.error, step.log = _error_of(outcome.status, answer), answer.get("log")
            step.outcome = "failed and restored" if answer.get("restored") else "failed"
            observe(step)
    except (PushError, EddError, OSError) as exc:
        step.outcome, step.error = "failed", str(exc)
        observe(step)
    finally:
        meter.close()
        step.updated = step.after not in (step.before, "unknown")
        step.bytes_sent, step.seconds = meter.sent, time.monotonic() - started


def run_rollout(steps, saved, options, err, stop):
    """Deploy to `steps` in order, up to options.parallel at once; start no new one
    after a failure or once `stop` is set. Return the steps still in flight when a
    signal came (their hosts finish or restore those deploys by themselves)."""
    pending, running, finished = list(steps), set(), queue.Queue()
    failed = False

    def work(step):
        try:
            deploy_step(step, saved, options, err)
        finally:
            finished.put(step)
    while running or (pending and not failed and not stop.is_set()):
        while pending and len(running) < options.parallel and not failed \
                and not stop.is_set():
            step = pending.pop(0)
            step.outcome = "in flight"
            running.add(step)
            threading.Thread(target=work, args=(step,), name="push", daemon=True).start()
        try:
            step = finished.get(timeout=POLL_TARGETS_SECONDS)
        except queue.Empty:
            if stop.is_set():
                return running
            continue
        running.discard(step)
        failed = failed or step.outcome not in ("deployed", "already running")
    return set()


def roll_back(steps, stop, err):
    """Put each target this push updated back on the image it ran before, last
    updated first, through its host's gate: POST rollback (or DELETE, for a target
    that had no container, stop for one that was not running); then check that the
    image the host reports is exactly the one the preflight recorded."""
    for step in reversed([s for s in steps if s.updated]):
        if stop.is_set():
            step.error = "interrupted before its rollback"
            continue
        print("edd push: %s: rolling back to %s" % (step.host.target, _short(step.before)),
              file=err)
        if step.before is None:
            calls = [("DELETE", None)]
        else:
            calls = [("POST", "rollback")] + (
                [] if step.before_state == "running" else [("POST", "stop")])
        try:
            for method, action in calls:
                status, answer = step.host.request(method, action, timeout=ANSWER_SECONDS)
                if status != 200:
                    raise PushError(_error_of(status, answer))
            step.after = answer.get("image_id")
        except PushError as exc:
            step.outcome, step.error = "rollback failed", str(exc)
            observe(step)
            continue
        if step.after == step.before:
            step.outcome, step.updated = "rolled back", False
        else:
            step.outcome = "not restored"
            step.error = "rolled back, but it runs %s, not %s as before this push" % (
                _short(step.after), _short(step.before))


def _short(image_id):
    if image_id is None:
        return "-"
    return image_id.split(":", 1)[-1][:12]


def fleet_summary(steps, options, interrupted):
    """One line: how the rollout ended, judged by what each host last reported."""
    new = [s for s in steps if s.outcome in ("deployed", "already running")]
    if len(new) == len(steps):
        return "all %d targets run the new image" % len(steps)
    failed = [str(s.host.target) for s in steps if s.outcome.startswith("failed")]
    how = ("interrupted" if interrupted else
           "the deploy to %s failed" % ", ".join(failed) if failed else "the rollout failed")
    if all(s.after == s.before for s in steps):
        return "%s; every target runs the image it ran before this push" % how
    changed = [str(s.host.target) for s in steps if s.after != s.before]
    reason = " (--no-rollback)" if options.no_rollback else ""
    return "%s; the fleet is left mixed%s: %s changed, the others did not" % (
        how, reason, ", ".join(changed))


def report_table(steps, preflight_only=False):
    """The human report: a header and one line per target."""
    if preflight_only:
        rows = [("TARGET", "PREFLIGHT")] + [
            (s.url, s.refused or "ok: %s, %s" % (_short(s.before), s.before_state))
            for s in steps]
    else:
        rows = [("TARGET", "BEFORE", "AFTER", "OUTCOME", "SENT", "SECONDS")] + [
            (s.url, _short(s.before), _short(s.after) if s.after != "unknown" else "?",
             s.outcome, _size(s.bytes_sent), "%.1f" % s.seconds) for s in steps]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                   + ("  " if widths else "") + row[-1] + "\n" for row in rows)


@contextlib.contextmanager
def stop_on_signals(stop):
    """While inside, SIGINT and SIGTERM set `stop` instead of ending the client."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = lambda number, frame: stop.set()
    saved = {number: signal.signal(number, handler)
             for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, previous in saved.items():
            signal.signal(number, previous)


def rollout_main(options, out, err, docker):
    """`edd.py push IMAGE URL URL…`: preflight, roll out, roll back on failure,
    report. Return the exit status (0, 1 or 2)."""
    stop = threading.Event()
    with stop_on_signals(stop):
        steps = rollout_steps(options)
        image = local_image(docker, options.image)
        print("edd push: asking %d targets which layers they have" % len(steps), file=err)
        preflight(steps, image)
        if stop.is_set() or any(s.refused for s in steps):
            _print_report(steps, options, out, err, "nothing was changed anywhere: %s"
                          % ("interrupted" if stop.is_set() else "the preflight failed"),
                          preflight_only=True)
            return 2
        saved = SavedImage(docker, image, keep=True)
        in_flight = run_rollout(steps, saved, options, err, stop)
        if not in_flight:
            saved.close()       # else uploads still read it: the exit closes it
        for step in in_flight:
            step.error = "the client stopped waiting; its host finishes or restores " \
                         "this deploy by itself: GET %s shows which" % step.url
        failed = any(s.outcome not in ("deployed", "already running") for s in steps)
        if failed and not options.no_rollback and not in_flight:
            roll_back(steps, stop, err)
    summary_line = fleet_summary(steps, options, stop.is_set())
    _print_report(steps, options, out, err, summary_line)
    if not failed:
        return 0
    return 1 if in_flight or any(s.outcome != "not attempted" for s in steps) else 2


def _print_report(steps, options, out, err, summary_line, preflight_only=False):
    if options.json:
        out.write(json_text([step.report() for step in steps]))
    else:
        out.write(report_table(steps, preflight_only))
    print("edd push: %s" % summary_line, file=err)
    for step in steps:
        if step.error:
            print("edd push: %s: %s" % (step.host.target, step.error), file=err)
        for line in (step.log or "").splitlines():
            print("  | " + line, file=err)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

# glibc's mallopt(3) settings edd makes: (environment variable, parameter, value).
MALLOC_SETTINGS = (
    # glibc gives each new thread an arena of its own (up to 8 per core) and keeps
    # what is freed in it: a thread per connection lifts RSS by megabytes for good.
    ("MALLOC_ARENA_MAX", -8, 2),                    # M_ARENA_MAX
    # glibc's default (128 KiB), fixed. Left dynamic, glibc raises it to 1 MiB,
    # and the trim threshold to 2 MiB, when an upload's 1 MiB buffer is freed:
    # from then on each arena keeps megabytes that no one uses.
    ("MALLOC_MMAP_THRESHOLD_", -3, 128 << 10),      # M_MMAP_THRESHOLD
)


def tune_malloc(settings=MALLOC_SETTINGS):
    """Apply `settings` with glibc's mallopt, each unless its environment variable
    is set (glibc has read that already); return what it applied, as NAME=value.
    Without glibc (musl) this quietly does nothing. Call it before threads start."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return []
        import ctypes       # here: only the daemon needs it, and only on glibc
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, ImportError, AttributeError):
        return []
    return ["%s=%d" % (name, value) for name, parameter, value in settings
            if name not in os.environ and mallopt(parameter, value) == 1]


def check(path):
    """Like `nginx -t`: validate the config, TLS files and docker; return 0 or 1."""
    try:
        config = load_config(path)
        make_ssl_context(config)
    except ConfigError as exc:
        print("edd: error: %s" % exc, file=sys.stderr)
        return 1
    try:
        engine = Docker(config.docker).detect()
    except DockerError as exc:
        print("edd: error: docker is not answering: %s" % exc, file=sys.stderr)
        return 1
    count = len(config.deployments)
    print("edd: %s is valid: %d deployment%s, TLS files load, %s answers"
          % (path, count, "" if count == 1 else "s", engine))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["push"]:
        return push_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="edd", description="Deploy container images pushed over mutual TLS.",
        epilog="`edd.py push --help`: the client, which sends only the layers a host lacks.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="config file (default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, TLS files and docker, then exit")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version="edd " + __version__)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.check:
        return check(args.config)
    log.debug("malloc tuned: %s", " ".join(tune_malloc()) or "nothing")
    try:
        app = App(load_config(args.config))
    except ConfigError as exc:
        print("edd: error: %s" % exc, file=sys.stderr)
        return 1
    try:
        server = Server(app)
    except OSError as exc:
        print("edd: error: cannot listen on %s:%d: %s"
              % (app.config.listen + (exc.strerror or exc,)), file=sys.stderr)
        return 1
    app.recover_all()
    return serve(app, server)


if __name__ == "__main__":
    sys.exit(main())
