#!/usr/bin/env python3
"""bench: how fast edd deploys, next to `docker load` locally and over ssh (issue 5).

Runs on one machine with a Docker engine, everything on 127.0.0.1:

    python3 bench/bench.py                    64 MiB and 256 MiB images (~3 min)
    python3 bench/bench.py --full             adds 1 GiB (~6 min)
    python3 bench/bench.py --sizes 1G --rounds 5 --verbose --json out.json
    python3 bench/bench.py --thin             edd push vs curl vs ssh for a redeploy
                                              that changes one layer (issue 12, ~10 min)

It builds images with an incompressible random layer, saves each to a file once,
and pushes that file three ways, cold every time (the image and its layer removed
first), interleaved in rotating order:

    edd     cat FILE | curl ... -T - https://127.0.0.1:PORT/v1/deployments/bench/load
    local   docker load -i FILE && docker run -d ...
    ssh     cat FILE | ssh -p PORT root@127.0.0.1 docker load && ssh ... docker run -d ...

and measures edd's memory and CPU (from /proc), the latency of a small push and of
GET /v1/deployments/bench over fresh mTLS connections, and the downtime of a
redeploy (a prober polls the deployment's port every 20 ms), next to the same swap
done by hand with docker stop, rm and run.

The figures are only as good as the machine is quiet: the report says how busy
it was with other work, and --rounds buys steadier medians.

It starts its own edd (a throwaway PKI, `settle_seconds: 0`) and its own sshd
(throwaway host and client keys, key auth only), and removes every container,
image, process and file it made, also when it fails. Any failed deploy (a non-200
answer, or the page the new container serves is not the pushed one) ends the run
with exit status 1. Targets that are missed are marked in the table, not fatal.

Needs root (sshd logs in as root and `docker` must answer), curl, openssl, ssh,
sshd and busybox (a static one: it is copied into the images). Python 3.8+,
standard library only.
"""

import argparse
import contextlib
import datetime
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDD = os.path.join(REPO, "edd.py")
BUSYBOX = os.environ.get("EDD_BENCH_BUSYBOX", "/usr/bin/busybox")
SSHD = "/usr/sbin/sshd"
MIB = 1 << 20
GIB = 1 << 30

# Unique per run: helpers and CI may run benches on one engine at the same time,
# and a bench removes its deployment's containers when it ends.
RUN_ID = os.urandom(3).hex()
DEPLOYMENT = "bench-" + RUN_ID
BENCH_CONTAINERS = ("eddbench-local", "eddbench-ssh", "eddbench-stop")
EDD_CONTAINERS = (DEPLOYMENT, DEPLOYMENT + ".edd-old")
EDD_TAGS = ("edd/%s:current" % DEPLOYMENT, "edd/%s:previous" % DEPLOYMENT)
SMALL_SIZE = 2 * MIB
PROBE_INTERVAL = 0.02

# busybox httpd as PID 1 ignores SIGTERM (PID 1 gets no default handlers), so a
# plain httpd CMD would make every `docker stop` wait out its timeout. Under a
# shell that exits on TERM the container stops at once, as a real service should.
PROMPT_STOP_CMD = ["/bin/busybox", "sh", "-c",
                   "trap 'exit 0' TERM; /bin/busybox httpd -f -p 8000 -h /www & wait"]

TARGETS = {
    "ratio_local": 1.15, "ratio_ssh": 1.0, "rss_mib": 40.0, "rss_flat_mib": 5.0,
    "small_push_s": 0.5, "get_p50_ms": 30.0, "downtime_extra_s": 0.5,
}


class BenchError(Exception):
    """Something the benchmark relies on failed; the run is void."""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def run(argv, check=True, timeout=600, **kwargs):
    """Run argv (a list, never a shell); return the CompletedProcess (text).
    With check, a non-zero exit raises BenchError carrying the command's stderr."""
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise BenchError("%s failed (exit %d): %s" % (" ".join(argv), done.returncode,
                                                      done.stderr.strip()[-2000:]))
    return done


def docker(*args, check=True, timeout=600):
    return run(["docker"] + [str(a) for a in args], check=check, timeout=timeout)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_size(text):
    match = re.match(r"(\d+)\s*([MG])i?B?\Z", text.strip(), re.I)
    if not match:
        raise argparse.ArgumentTypeError("%r: sizes look like 64M, 256M, 1G" % text)
    return int(match.group(1)) * (MIB if match.group(2).upper() == "M" else GIB)


def size_label(size):
    return "%dG" % (size // GIB) if size % GIB == 0 else "%dM" % (size // MIB)


def percentile(values, percent):
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100.0 * len(ordered)) - 1)]


def progress(message):
    print("bench: " + message, file=sys.stderr, flush=True)


def http_get(port, timeout=1.0):
    """The body served at http://127.0.0.1:port/, or None when nothing answers 200."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/")
            reply = conn.getresponse()
            body = reply.read().decode("utf-8", "replace")
            return body if reply.status == 200 else None
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def expect_page(port, page, timeout=10.0):
    """Fail the run unless http://127.0.0.1:port/ serves `page` within `timeout`."""
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        body = http_get(port)
        if body == page:
            return
        time.sleep(0.05)
    raise BenchError("deploy failed: 127.0.0.1:%d serves %r, expected %r"
                     % (port, body, page))


class MachineCpu:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""

    @staticmethod
    def busy_seconds():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]            # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @classmethod
    def background(cls, seconds=1.0):
        """Cores kept busy by others while the bench itself waits `seconds`."""
        before = cls.busy_seconds()
        time.sleep(seconds)
        return (cls.busy_seconds() - before) / seconds


# ---------------------------------------------------------------------------
# PKI (the openssl CLI, EC P-256 like the Makefile's dev PKI)
# ---------------------------------------------------------------------------

def make_pki(folder):
    """CA, server (localhost, 127.0.0.1) and client certificates in `folder`."""
    os.makedirs(folder)

    def path(name):
        return os.path.join(folder, name)

    def key(name):
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
             "ec_paramgen_curve:P-256", "-out", path(name + ".key")])

    def leaf(name, cn, extensions):
        key(name)
        with open(path(name + ".ext"), "w") as ext:
            ext.write("\n".join(extensions + ["subjectKeyIdentifier = hash",
                                              "authorityKeyIdentifier = keyid"]) + "\n")
        run(["openssl", "req", "-new", "-key", path(name + ".key"), "-subj", "/CN=" + cn,
             "-out", path(name + ".csr")])
        run(["openssl", "x509", "-req", "-sha256", "-days", "2", "-in", path(name + ".csr"),
             "-CA", path("ca.crt"), "-CAkey", path("ca.key"), "-set_serial",
             str(int.from_bytes(os.urandom(8), "big")), "-extfile", path(name + ".ext"),
             "-out", path(name + ".crt")])

    key("ca")
    with open(path("ca.cnf"), "w") as cnf:
        cnf.write("[req]\ndistinguished_name = dn\n[dn]\n[ca]\n"
                  "basicConstraints = critical, CA:TRUE\n"
                  "keyUsage = critical, keyCertSign, cRLSign\n"
                  "subjectKeyIdentifier = hash\n")
    run(["openssl", "req", "-x509", "-new", "-sha256", "-days", "2", "-key", path("ca.key"),
         "-subj", "/CN=edd bench CA", "-config", path("ca.cnf"), "-extensions", "ca",
         "-out", path("ca.crt")])
    leaf("server", "localhost", ["basicConstraints = CA:FALSE",
                                 "keyUsage = critical, digitalSignature",
                                 "extendedKeyUsage = serverAuth",
                                 "subjectAltName = DNS:localhost, IP:127.0.0.1"])
    leaf("client", "bench-client", ["basicConstraints = CA:FALSE",
                                    "keyUsage = critical, digitalSignature",
                                    "extendedKeyUsage = clientAuth"])
    return folder


# ---------------------------------------------------------------------------
# Images: busybox, a page and a random layer, saved to a file once
# ---------------------------------------------------------------------------

class Image:
    """A `docker save` archive on disk, and what a deploy of it must serve."""

    def __init__(self, tag, archive, page):
        self.tag, self.archive, self.page = tag, archive, page
        self.size = os.path.getsize(archive)
        self.id = archive_image_id(archive)


class RandomFile:
    """A file-like object of `size` incompressible bytes, for tarfile.addfile."""

    def __init__(self, size):
        self.left = size

    def read(self, count=-1):
        count = self.left if count < 0 else min(count, self.left)
        self.left -= count
        return os.urandom(count)


class BytesFile:
    """A file-like object over `data`, for tarfile.addfile."""

    def __init__(self, data):
        self.data = data

    def read(self, count=-1):
        count = len(self.data) if count < 0 else count
        chunk, self.data = self.data[:count], self.data[count:]
        return chunk


def archive_image_id(archive):
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    if len(manifest) != 1:
        raise BenchError("%s holds %d images, expected 1" % (archive, len(manifest)))
    return "sha256:" + manifest[0]["Config"].split("/")[-1].replace(".json", "")


def _add(tar, name, data=None, size=0, mode=0o644, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, int(time.time())
    if kind == tarfile.REGTYPE:
        info.size = size
    tar.addfile(info, data)


def build_image(folder, tag, random_bytes, page):
    """Import a rootfs (busybox, /www/index.html = page, a random file) as `tag`,
    save it to a file in `folder`, remove it from the engine; return the Image.
    An archive already there (a --workdir kept from an earlier run) is reused."""
    archive = os.path.join(folder, tag.replace("/", "_").replace(":", "_") + ".tar")
    if os.path.exists(archive):
        return Image(tag, archive, page)
    importer = subprocess.Popen(
        ["docker", "import", "--change", "CMD " + json.dumps(PROMPT_STOP_CMD), "-", tag],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=importer.stdin, mode="w|", copybufsize=MIB) as tar:
            for folder_name in ("bin", "www", "data", "tmp"):
                _add(tar, folder_name, kind=tarfile.DIRTYPE, mode=0o755)
            with open(BUSYBOX, "rb") as busybox:
                _add(tar, "bin/busybox", busybox, os.path.getsize(BUSYBOX), 0o755)
            encoded = page.encode()
            _add(tar, "www/index.html", BytesFile(encoded), len(encoded))
            _add(tar, "data/random.bin", RandomFile(random_bytes), random_bytes)
    except BrokenPipeError:
        pass            # docker import quit early: its stderr says why
    out, err = importer.communicate()
    if importer.returncode != 0:
        raise BenchError("docker import %s failed: %s" % (tag, err.decode().strip()))
    partial = archive + ".part"
    docker("save", "-o", partial, tag)
    os.rename(partial, archive)
    docker("rmi", tag)
    return Image(tag, archive, page)


# ---------------------------------------------------------------------------
# edd: the daemon under test, and what /proc says about it
# ---------------------------------------------------------------------------

LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (.*)")


class Edd:
    """A running edd with its own config; stderr is kept line by line."""

    def __init__(self, folder, pki, python, app_port, program=EDD):
        self.port = free_port()
        self.app_port = app_port
        self.pki = pki
        config = {
            "listen": "127.0.0.1:%d" % self.port,
            "server_cert": os.path.join(pki, "server.crt"),
            "server_key": os.path.join(pki, "server.key"),
            "client_ca": os.path.join(pki, "ca.crt"),
            "deployments": [{"name": DEPLOYMENT,
                             "args": ["-p", "127.0.0.1:%d:8000" % app_port],
                             "settle_seconds": 0, "stop_timeout_seconds": 2}],
        }
        self.config_path = os.path.join(folder, "edd.json")
        with open(self.config_path, "w") as file:
            json.dump(config, file, indent=2)
        self.lines = []
        # --log-level debug logs each docker command as it starts: the bench
        # reads the phases of a deploy from those timestamps.
        self.proc = subprocess.Popen(
            [python, program, "--config", self.config_path, "--log-level", "debug"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._wait_listening()
        self.url = "https://127.0.0.1:%d" % self.port
        self.tls = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.tls.load_cert_chain(os.path.join(pki, "client.crt"),
                                 os.path.join(pki, "client.key"))

    def _read_log(self):
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def _wait_listening(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any("listening on" in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError("edd did not start; its log:\n" + self.log_tail())

    def log_tail(self, count=30):
        return "\n".join(self.lines[-count:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)

    # -- /proc --------------------------------------------------------------

    def cpu_seconds(self):
        """(edd's own CPU seconds, its reaped children's: the docker CLI runs)."""
        with open("/proc/%d/stat" % self.proc.pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are 14-17.
        return ((int(fields[11]) + int(fields[12])) / tick,
                (int(fields[13]) + int(fields[14])) / tick)

    def _status_kib(self, key):
        with open("/proc/%d/status" % self.proc.pid) as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise BenchError("no %s in /proc/%d/status" % (key, self.proc.pid))

    def rss_mib(self):
        return self._status_kib("VmRSS") / 1024.0

    def reset_peak_rss(self):
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
        with open("/proc/%d/clear_refs" % self.proc.pid, "w") as refs:
            refs.write("5")

    def peak_rss_mib(self):
        return self._status_kib("VmHWM") / 1024.0

    # -- the API ------------------------------------------------------------

    def curl_push_argv(self):
        """The README's push command (reading the archive from stdin)."""
        return ["curl", "-sS", "--cacert", os.path.join(self.pki, "ca.crt"),
                "--key", os.path.join(self.pki, "client.key"),
                "--cert", os.path.join(self.pki, "client.crt"),
                "-X", "POST", "-H", "Content-Type:application/x-tar", "-T", "-",
                "-w", "\n%{http_code}",
                "%s/v1/deployments/%s/load" % (self.url, DEPLOYMENT)]

    def get(self, path):
        """(status, decoded JSON) of GET `path` over a fresh mTLS connection."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls,
                                           timeout=30)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            body = reply.read()
            if reply.getheader("Content-Type", "").startswith("application/json"):
                return reply.status, json.loads(body)
            return reply.status, body.decode("utf-8", "replace")
        finally:
            conn.close()

    # -- its log ------------------------------------------------------------

    def deploy_phases(self, first_line):
        """Phases of the one load request logged after line `first_line`, in seconds:
        receive (request start to `docker load` done), swap (the rest), gate (the
        health gate's docker inspect), and every docker command with its duration."""
        events = []
        for line in self.lines[first_line:]:
            match = LOG_LINE.match(line)
            if match:
                stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                events.append((stamp.timestamp(), match.group(3)))
        done = [(t, m) for t, m in events if m.startswith("request ") and "/load" in m]
        if not done:
            return None
        end = done[-1][0]
        start = end - int(re.search(r"duration_ms=(\d+)", done[-1][1]).group(1)) / 1000.0
        commands = [(t, m[len("docker: "):]) for t, m in events if m.startswith("docker: ")]
        steps = [(m, (commands[i + 1][0] if i + 1 < len(commands) else end) - t)
                 for i, (t, m) in enumerate(commands)]
        loaded = next((i for i, (_, m) in enumerate(commands) if m.endswith(" load")), None)
        if loaded is None or loaded + 1 >= len(commands):
            return None
        received = commands[loaded + 1][0] - start
        # The gate polls with `docker container inspect` right after the container
        # starts; with settle_seconds 0 that first inspect is all it waits.
        started = [i for i, (_, m) in enumerate(commands)
                   if i > loaded and m.split()[1:2] in (["run"], ["start"])]
        gate = steps[started[-1] + 1][1] if started and started[-1] + 1 < len(steps) else None
        return {"receive": received, "swap": end - start - received, "gate": gate,
                "steps": steps}


# ---------------------------------------------------------------------------
# sshd on a loopback port, with throwaway keys
# ---------------------------------------------------------------------------

class Sshd:
    """Debian's sshd on 127.0.0.1:port, key auth for root only; ssh_argv() logs in."""

    def __init__(self, folder):
        os.makedirs(folder)
        self.port = free_port()
        self.host_key = os.path.join(folder, "host_key")
        self.client_key = os.path.join(folder, "client_key")
        for key in (self.host_key, self.client_key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
        shutil.copy(self.client_key + ".pub", os.path.join(folder, "authorized_keys"))
        config = os.path.join(folder, "sshd_config")
        with open(config, "w") as file:
            file.write("\n".join([
                "Port %d" % self.port, "ListenAddress 127.0.0.1",
                "HostKey " + self.host_key, "PidFile " + os.path.join(folder, "sshd.pid"),
                "AuthorizedKeysFile " + os.path.join(folder, "authorized_keys"),
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            ]) + "\n")
        # sshd refuses to start without its privilege separation directory.
        self.made_privsep = not os.path.isdir("/run/sshd")
        if self.made_privsep:
            os.makedirs("/run/sshd", mode=0o755)
        self.log_path = os.path.join(folder, "sshd.log")
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", config],
                                         stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=log_file, start_new_session=True)
        self._wait_listening()
        self.cipher = self._cipher()

    def _wait_listening(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        with open(self.log_path) as log_file:
            raise BenchError("sshd did not start: " + log_file.read()[-2000:])

    def ssh_argv(self, *command, verbose=False):
        return (["ssh", "-F", "/dev/null", "-i", self.client_key, "-p", str(self.port),
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "BatchMode=yes", "-o", "LogLevel=" + ("DEBUG1" if verbose else "ERROR"),
                 "root@127.0.0.1"] + list(command))

    def _cipher(self):
        done = run(self.ssh_argv("true", verbose=True))
        match = re.search(r"client->server cipher: (\S+)", done.stderr)
        return match.group(1) if match else "?"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.made_privsep:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


# ---------------------------------------------------------------------------
# The three ways to deploy an archive
# ---------------------------------------------------------------------------

def pipe_file(path, argv):
    """Run `cat path | argv`; return (argv's exit status, its stdout, its stderr)."""
    cat = subprocess.Popen(["cat", path], stdout=subprocess.PIPE)
    command = subprocess.Popen(argv, stdin=cat.stdout, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    cat.stdout.close()
    out, err = command.communicate()
    if cat.wait() != 0:
        raise BenchError("cat %s failed" % path)
    return command.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


class Methods:
    """The ways to deploy an archive: via_edd, via_local, via_ssh. Each deploys
    image.archive and returns its wall time; the page served afterwards is checked
    by the caller, outside the timed part."""

    def __init__(self, app_port):
        self.app_port = app_port
        self.edd = self.sshd = None
        self.images = []          # every Image the bench may have loaded
        self.tags = set()         # every tag it may have created
        self.running = None       # the Image edd deployed last
        self.background = []      # cores busy with other work, sampled between phases

    def _remove_all(self):
        docker("rm", "-f", *(EDD_CONTAINERS + BENCH_CONTAINERS), check=False)
        refs = list(EDD_TAGS) + sorted(self.tags) + [image.id for image in self.images]
        docker("rmi", "-f", *refs, check=False)
        self.running = None
        return refs

    def cold(self):
        """No container of ours and none of our images or their layers in the engine."""
        refs = self._remove_all()
        left = docker("image", "inspect", "--format", "{{.Id}}", *refs, check=False)
        if left.stdout.strip():
            raise BenchError("could not remove images before a cold run: "
                             + left.stdout.strip())
        os.sync()       # write-back of the last run's layer must not land in this one

    def clean_up(self):
        """cold() for the end of the run: never raises, so other clean-ups still run."""
        try:
            self._remove_all()
        except Exception as exc:            # noqa: the run is ending anyway
            progress("clean-up of docker objects failed: %s" % exc)

    def edd_push(self, image):
        """cat FILE | curl -T - .../load; return (seconds, edd's JSON answer)."""
        started = time.monotonic()
        status, out, err = pipe_file(image.archive, self.edd.curl_push_argv())
        seconds = time.monotonic() - started
        body, _, code = out.rpartition("\n")
        if status != 0 or code != "200":
            raise BenchError("deploy failed: edd push of %s: curl exit %d, HTTP %s: %s %s\n"
                             "edd log:\n%s" % (image.tag, status, code, body.strip()[-2000:],
                                               err.strip(), self.edd.log_tail()))
        answer = json.loads(body)
        if answer.get("state") != "running" or answer.get("image_id") != image.id:
            raise BenchError("deploy failed: edd answered 200 but: %s" % body[-2000:])
        self.running = image
        return seconds, answer

    def via_edd(self, image):
        return self.edd_push(image)[0]

    def via_local(self, image):
        started = time.monotonic()
        docker("load", "-i", image.archive)
        docker("run", "-d", "-p", "127.0.0.1:%d:8000" % self.app_port,
               "--name", "eddbench-local", image.tag)
        return time.monotonic() - started

    def via_ssh(self, image):
        started = time.monotonic()
        status, out, err = pipe_file(image.archive, self.sshd.ssh_argv("docker", "load"))
        if status != 0:
            raise BenchError("deploy failed: ssh docker load: exit %d: %s" % (status, err))
        run(self.sshd.ssh_argv("docker", "run", "-d", "-p",
                               "127.0.0.1:%d:8000" % self.app_port,
                               "--name", "eddbench-ssh", image.tag))
        return time.monotonic() - started


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

class RssSampler:
    """Samples edd's VmRSS every few ms while active (VmHWM is read as well)."""

    def __init__(self, edd):
        self.edd, self.peak, self._stop = edd, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self.edd.reset_peak_rss()
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            with contextlib.suppress(OSError, BenchError):
                self.peak = max(self.peak, self.edd.rss_mib())
            self._stop.wait(0.005)

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.edd.peak_rss_mib())


def measure_transfer(methods, image, label, rounds, order):
    """`rounds` cold runs of each method, order rotated each round; return results."""
    edd = methods.edd
    with open(image.archive, "rb") as archive:         # same page-cache state for all
        while archive.read(8 * MIB):
            pass
    runs = {name: [] for name in order}
    methods.background.append(MachineCpu.background())
    for round_index in range(rounds):
        rotated = order[round_index % len(order):] + order[:round_index % len(order)]
        times = {}
        for name in rotated:
            methods.cold()
            first_line = len(edd.lines)
            cpu_before, busy_before = edd.cpu_seconds(), MachineCpu.busy_seconds()
            with RssSampler(edd) as rss:
                seconds = getattr(methods, "via_" + name)(image)
            busy = MachineCpu.busy_seconds() - busy_before
            expect_page(methods.app_port, image.page)
            record = {"seconds": seconds, "machine_cpu": busy, "bytes": image.size}
            if name == "edd":
                cpu_after = edd.cpu_seconds()
                record.update(rss=rss.peak, cpu=cpu_after[0] - cpu_before[0],
                              children_cpu=cpu_after[1] - cpu_before[1],
                              phases=edd.deploy_phases(first_line))
            runs[name].append(record)
            times[name] = seconds
        progress("%s round %d: %s" % (label, round_index + 1, ", ".join(
            "%s %.2f s" % (name, times[name]) for name in order)))
    methods.cold()
    return runs


def other(images, running):
    """Of the two small images, the one that is not running."""
    return images[1] if running is images[0] else images[0]


def push_other(methods, images):
    """Push the small image that is not running, cold (it may be tagged previous);
    return the end-to-end seconds."""
    image = other(images, methods.running)
    docker("rmi", "-f", image.id, check=False)
    seconds = methods.edd_push(image)[0]
    expect_page(methods.app_port, image.page)
    return seconds


def measure_small_pushes(methods, images, count):
    """End-to-end seconds of small pushes: first deploys (no container yet), the
    same with `docker load -i` + `docker run` for reference, and `count` pushes
    that each replace the running container; and the phases of the last one."""
    fresh, local = [], []
    for _ in range(max(3, count // 2)):
        methods.cold()
        local.append(methods.via_local(images[0]))
        expect_page(methods.app_port, images[0].page)
        methods.cold()
        fresh.append(push_other(methods, images))
    swaps = []
    for _ in range(count):
        first_line = len(methods.edd.lines)
        swaps.append(push_other(methods, images))
    return {"fresh": fresh, "local": local, "swaps": swaps,
            "swap_phases": methods.edd.deploy_phases(first_line)}


def measure_get(edd, count, path="/v1/deployments/" + DEPLOYMENT):
    """Seconds of `count` GETs of `path`, each on a fresh mTLS connection."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        status, answer = edd.get(path)
        times.append(time.monotonic() - started)
        if status != 200 or (path.endswith(DEPLOYMENT) and answer.get("state") != "running"):
            raise BenchError("GET %s answered %d: %s" % (path, status, answer))
    return times


class Prober:
    """Sends GET http://127.0.0.1:port/ every 20 ms, each probe in its own thread so
    that one hanging connection does not delay the next probe."""

    def __init__(self, port):
        self.port, self.results = port, []      # (sent, answered or failed, page)
        self._stop, self._lock, self._probes = threading.Event(), threading.Lock(), []
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _poll(self):
        next_at = time.monotonic()
        while not self._stop.is_set():
            probe = threading.Thread(target=self._probe, daemon=True)
            probe.start()
            self._probes.append(probe)
            next_at += PROBE_INTERVAL
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _probe(self):
        sent = time.monotonic()
        page = http_get(self.port, timeout=1.0)
        with self._lock:
            self.results.append((sent, time.monotonic(), page))

    def seen(self, page):
        with self._lock:
            return any(answer == page for _, _, answer in self.results)

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        for probe in self._probes:
            probe.join(2)

    def outage(self, old_page, new_page):
        """(seconds, timeline): the longest time in which no probe got an answer; the
        timeline has a letter per probe, in the order sent: o old page, n new page,
        x no answer."""
        results = sorted(self.results)
        timeline = "".join("x" if page is None else "o" if page == old_page
                           else "n" if page == new_page else "?" for _, _, page in results)
        if "?" in timeline or not timeline.startswith("o") or not timeline.endswith("n"):
            raise BenchError("the prober saw something odd during a redeploy: " + timeline)
        answered = sorted(done for _, done, page in results if page is not None)
        return max(b - a for a, b in zip(answered, answered[1:])), timeline


def measure_downtime(methods, images, count):
    """Outage seen by the prober while edd swaps v1 and v2, `count` times."""
    gaps = []
    if methods.running is None:
        push_other(methods, images)
    for index in range(count):
        old_page = methods.running.page
        with Prober(methods.app_port) as prober:
            time.sleep(0.2)
            push_other(methods, images)
            deadline = time.monotonic() + 5
            while not prober.seen(methods.running.page) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)
        gap, timeline = prober.outage(old_page, methods.running.page)
        gaps.append(gap)
        progress("swap %d: outage %.3f s: %s" % (index + 1, gap, timeline))
    return gaps


def measure_plain_downtime(methods, images, count):
    """For reference, the same swap without edd (docker stop, rm, run), watched alike."""
    methods.cold()
    for image in images:
        docker("load", "-i", image.archive)

    def start(image):
        docker("run", "-d", "-p", "127.0.0.1:%d:8000" % methods.app_port,
               "--name", "eddbench-local", image.tag)
        expect_page(methods.app_port, image.page)
    running, gaps = images[0], []
    start(running)
    for index in range(count):
        image = other(images, running)
        with Prober(methods.app_port) as prober:
            time.sleep(0.2)
            docker("stop", "-t", "2", "eddbench-local")
            docker("rm", "eddbench-local")
            start(image)
            time.sleep(0.1)
        gap, timeline = prober.outage(running.page, image.page)
        gaps.append(gap)
        progress("plain swap %d: outage %.3f s: %s" % (index + 1, gap, timeline))
        running = image
    methods.cold()
    return gaps


def measure_stop_time(image, count):
    """`docker stop -t 2` of the image's container alone, no edd involved."""
    docker("load", "-i", image.archive)
    times = []
    for _ in range(count):
        docker("rm", "-f", "eddbench-stop", check=False)
        docker("run", "-d", "--name", "eddbench-stop", image.tag)
        time.sleep(0.3)            # let httpd start, as it has in a deployment
        started = time.monotonic()
        docker("stop", "-t", "2", "eddbench-stop")
        times.append(time.monotonic() - started)
    docker("rm", "-f", "eddbench-stop", check=False)
    return times


# ---------------------------------------------------------------------------
# Thin push (issue 12): redeploy a v2 that shares its base with the running v1
# ---------------------------------------------------------------------------
#
# `--thin` runs this instead of the measurements above. v1 and v2 are a base
# (busybox and an incompressible file of the size measured) plus a 16 MiB
# incompressible application layer that differs between them, built as users
# build: docker create BASE, docker cp, docker commit. Before every timed run the
# host runs v1 (edd's deployment, and a container for the ssh way) and has no
# trace of v2; then v2 is deployed three ways:
#
#     thin   edd.py push v2 https://127.0.0.1:PORT/v1/deployments/bench
#     full   cat v2.tar | curl ... -T - .../load         (today's push)
#     ssh    cat v2.tar | ssh docker load; ssh docker rm -f ... && docker run ...
#
# Host and client share this machine's engine, so the client's engine is stood in
# for by a `docker` wrapper that answers `image inspect` for v2 from a recorded
# copy and `save` with `cat v2.tar`, as the other two ways read the same file;
# everything else goes to the real docker. Over a simulated uplink, traffic to
# edd's and sshd's ports on `lo` goes through an htb class of UPLINK_RATE (tc,
# u32 on the destination port); the class's byte counter gives the bytes on the
# wire. The qdisc is always removed afterwards (finally, and `make bench` traps).

APP_LAYER_BYTES = 16 * MIB
UPLINK_RATE = "100mbit"
TC_HANDLE = "edd:"            # 0xedd; a root qdisc with this handle is the bench's own
THIN_TARGETS = {"thin_extra_bytes": MIB, "shaped_ratio": 0.25, "overhead": 1.3}
SSH_CONTAINER = "eddbench-ssh-" + RUN_ID
THIN_METHODS = ["thin", "full", "ssh"]


def tc(*args, check=True):
    return run(["tc"] + list(args), check=check)


@contextlib.contextmanager
def shaped_uplink(ports, rate):
    """Shape the traffic to `ports` on lo to `rate` while the block runs; yield a
    function that returns the bytes sent through the shaped class so far."""
    shown = tc("qdisc", "show", "dev", "lo").stdout
    if "htb %s" % TC_HANDLE in shown:
        progress("removing a qdisc left on lo by an earlier bench run")
        tc("qdisc", "del", "dev", "lo", "root")
    elif "qdisc noqueue 0: root" not in tc("qdisc", "show", "dev", "lo").stdout:
        raise BenchError("lo already has a root qdisc, someone else's; not touching it:\n"
                         + shown)
    try:
        tc("qdisc", "add", "dev", "lo", "root", "handle", TC_HANDLE, "htb")
        tc("class", "add", "dev", "lo", "parent", TC_HANDLE, "classid", TC_HANDLE + "1",
           "htb", "rate", rate, "ceil", rate)
        for port in ports:
            tc("filter", "add", "dev", "lo", "parent", TC_HANDLE, "protocol", "ip", "prio",
               "1", "u32", "match", "ip", "dport", str(port), "0xffff",
               "flowid", TC_HANDLE + "1")

        def sent_bytes():
            stats = tc("-s", "class", "show", "dev", "lo", "classid", TC_HANDLE + "1").stdout
            return int(re.search(r"Sent (\d+) bytes", stats).group(1))
        yield sent_bytes
    finally:
        tc("qdisc", "del", "dev", "lo", "root", "handle", TC_HANDLE, check=False)


def commit_app(base_tag, tag, page, app_bytes):
    """`tag` = base_tag plus one layer: /www/index.html = page and app_bytes of noise."""
    container = docker("create", base_tag).stdout.strip()
    try:
        copier = subprocess.Popen(["docker", "cp", "-", container + ":/"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        with tarfile.open(fileobj=copier.stdin, mode="w|", copybufsize=MIB) as tar:
            encoded = page.encode()
            _add(tar, "www/index.html", BytesFile(encoded), len(encoded))
            _add(tar, "app", kind=tarfile.DIRTYPE, mode=0o755)
            _add(tar, "app/app.bin", RandomFile(app_bytes), app_bytes)
        out, err = copier.communicate()
        if copier.returncode != 0:
            raise BenchError("docker cp into %s failed: %s" % (container, err.decode()))
        docker("commit", "-c", "CMD " + json.dumps(PROMPT_STOP_CMD), container, tag)
    finally:
        docker("rm", "-f", container, check=False)


class LayeredPair:
    """v1 and v2 sharing a base of `base_bytes`; v1 stays in the engine, v2 only as a
    saved archive (and its recorded `docker image inspect`)."""

    def __init__(self, workdir, base_bytes, methods):
        label = size_label(base_bytes).lower()
        base = build_image(workdir, "eddbench/base-%s:1" % label, base_bytes, "base\n")
        methods.images.append(base)
        docker("load", "-i", base.archive)
        self.images = []
        for version in (1, 2):
            tag = "eddbench/app-%s:v%d" % (label, version)
            methods.tags.add(tag)
            page = "eddbench app %s v%d\n" % (label, version)
            commit_app(base.tag, tag, page, APP_LAYER_BYTES)
            archive = os.path.join(workdir, "app-%s-v%d.tar" % (label, version))
            docker("save", "-o", archive, tag)
            self.images.append(Image(tag, archive, page))
        self.v1, self.v2 = self.images
        methods.images += self.images
        self.inspect = os.path.join(workdir, "app-%s-v2.inspect.json" % label)
        with open(self.inspect, "w") as file:
            file.write(docker("image", "inspect", self.v2.tag).stdout)
        with tarfile.open(self.v2.archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
            self.app_layer = tar.getmember(manifest[0]["Layers"][-1]).size
        docker("rmi", "-f", self.v2.id)

    def client_docker(self, folder):
        """A folder with the stand-in `docker` of the client (see above) for PATH."""
        os.makedirs(folder, exist_ok=True)
        real = shutil.which("docker")
        with open(os.path.join(folder, "docker"), "w") as script:
            script.write(
                '#!/bin/sh\n'
                'if [ "$1 $2 $3" = "image inspect %s" ]; then exec cat %s; fi\n'
                'if [ "$1 $2" = "save %s" ]; then exec cat %s; fi\n'
                'exec %s "$@"\n' % (self.v2.tag, self.inspect, self.v2.tag, self.v2.archive,
                                     real))
        os.chmod(os.path.join(folder, "docker"), 0o755)
        return folder


def edd_post(edd, path):
    conn = http.client.HTTPSConnection("127.0.0.1", edd.port, context=edd.tls, timeout=120)
    try:
        conn.request("POST", path)
        reply = conn.getresponse()
        body = reply.read()
        if reply.status != 200:
            raise BenchError("POST %s answered %d: %s" % (path, reply.status, body[-2000:]))
        return json.loads(body)
    finally:
        conn.close()


class ThinRuns:
    """The three ways to deploy v2 over a running v1, and the reset between runs."""

    def __init__(self, methods, pair, args, client_bin, ssh_app_port):
        self.methods, self.pair = methods, pair
        self.python, self.program = args.python, os.path.abspath(args.edd)
        self.edd, self.sshd = methods.edd, methods.sshd
        self.ssh_app_port = ssh_app_port
        pki = self.edd.pki
        self.env = dict(os.environ, PATH=client_bin + os.pathsep + os.environ["PATH"],
                        EDD_CERT=os.path.join(pki, "client.crt"),
                        EDD_KEY=os.path.join(pki, "client.key"),
                        EDD_CACERT=os.path.join(pki, "ca.crt"))
        self.ssh_run = ("docker rm -f %s >/dev/null 2>&1; docker run -d --name %s -p "
                        "127.0.0.1:%d:8000 %%s" % (SSH_CONTAINER, SSH_CONTAINER, ssh_app_port))

    def start(self):
        """First deploys of v1, not timed: edd's deployment and the ssh container."""
        self.methods.edd_push(self.pair.v1)
        run(["sh", "-c", self.ssh_run % self.pair.v1.tag])
        self.reset()

    def reset(self):
        """Back to: edd and the ssh container run v1, and the engine has no v2."""
        path = "/v1/deployments/%s" % DEPLOYMENT
        if self.edd.get(path)[1].get("image_id") != self.pair.v1.id:
            edd_post(self.edd, path + "/rollback")
        run(["sh", "-c", self.ssh_run % self.pair.v1.tag])
        docker("rmi", "-f", self.pair.v2.id, check=False)
        if docker("image", "inspect", self.pair.v2.id, check=False).returncode == 0:
            raise BenchError("could not remove v2 before a run")
        expect_page(self.methods.app_port, self.pair.v1.page)
        os.sync()

    def via_thin(self):
        """(seconds, archive bytes sent)"""
        started = time.monotonic()
        done = run([self.python, self.program, "push", "--json", self.pair.v2.tag,
                    "%s/v1/deployments/%s" % (self.edd.url, DEPLOYMENT)], check=False,
                   env=self.env)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise BenchError("deploy failed: edd push: exit %d: %s %s\nedd log:\n%s" % (
                done.returncode, done.stdout[-2000:], done.stderr[-2000:],
                self.edd.log_tail()))
        answer = json.loads(done.stdout)
        if answer.get("image_id") != self.pair.v2.id or answer.get("fallback"):
            raise BenchError("edd push did not deploy v2 thin: %s" % done.stdout[-2000:])
        return seconds, answer["bytes_sent"], self.methods.app_port

    def via_full(self):
        return self.methods.edd_push(self.pair.v2)[0], self.pair.v2.size, self.methods.app_port

    def via_ssh(self):
        started = time.monotonic()
        status, out, err = pipe_file(self.pair.v2.archive, self.sshd.ssh_argv("docker", "load"))
        if status != 0:
            raise BenchError("deploy failed: ssh docker load: exit %d: %s" % (status, err))
        run(self.sshd.ssh_argv(self.ssh_run % self.pair.v2.tag))
        return time.monotonic() - started, self.pair.v2.size, self.ssh_app_port


def measure_thin(runs, rounds, label, wire_bytes=None):
    """`rounds` of each way to deploy v2, in rotating order; {method: [record]}."""
    records = {name: [] for name in THIN_METHODS}
    for index in range(rounds):
        rotated = THIN_METHODS[index % 3:] + THIN_METHODS[:index % 3]
        for name in rotated:
            runs.reset()
            before = wire_bytes() if wire_bytes else None
            seconds, body, port = getattr(runs, "via_" + name)()
            wire = wire_bytes() - before if wire_bytes else None
            expect_page(port, runs.pair.v2.page)
            records[name].append({"seconds": seconds, "body_bytes": body, "wire_bytes": wire})
        progress("%s round %d: %s" % (label, index + 1, ", ".join(
            "%s %.2f s" % (name, records[name][-1]["seconds"]) for name in THIN_METHODS)))
    return records


def load_edd_module(program):
    spec = importlib.util.spec_from_file_location("edd_under_test", program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_client_overhead(pair, rounds, program):
    """Seconds of a bare `docker save v2 > /dev/null` and of what edd push does in its
    place (save to its temporary file, read the archive, filter out the base), in
    alternation; v2 loaded in the engine for it and removed afterwards."""
    edd = load_edd_module(program)
    docker("load", "-i", pair.v2.archive)
    bare, client = [], []
    try:
        with open(os.devnull, "w") as devnull:
            for _ in range(rounds):
                started = time.monotonic()
                run(["sh", "-c", "docker save %s > /dev/null" % pair.v2.tag])
                bare.append(time.monotonic() - started)
                started = time.monotonic()
                local = edd.local_image(edd.Docker(), pair.v2.tag)
                spooled, archive = edd.spool(edd.Docker(), pair.v2.tag, edd.Meter(devnull))
                with spooled:
                    plan = edd.thin_plan(spooled, archive, local, len(local.layers) - 1,
                                         ("legacy", "oci"))
                    for _ in edd.filter_archive(edd.file_chunks(spooled), edd.Archive(), plan,
                                                strip=False):
                        pass
                client.append(time.monotonic() - started)
    finally:
        docker("rmi", "-f", pair.v2.id, check=False)
    return {"bare": bare, "client": client}


def spread(values):
    return "%.2f [%.2f-%.2f]" % (median(values), min(values), max(values))


def thin_report(results, rounds, machine):
    out = [machine, "load before: %s; after: %s" % (results["loadavg"][0], results["loadavg"][-1]),
           "", "Redeploy of v2 over a running v1 (same base, new %d MiB layer); %d rounds, "
           "seconds as median [min-max]" % (APP_LAYER_BYTES // MIB, rounds),
           "%-9s %-5s %-6s %-20s %12s %12s" % ("link", "base", "way", "seconds", "body MiB",
                                               "wire MiB")]
    checks = []
    for (link, label), records in results["runs"].items():
        for name in THIN_METHODS:
            seconds = [r["seconds"] for r in records[name]]
            body = median([r["body_bytes"] for r in records[name]])
            wires = [r["wire_bytes"] for r in records[name] if r["wire_bytes"] is not None]
            out.append("%-9s %-5s %-6s %-20s %12.2f %12s" % (
                link, label, name, spread(seconds), body / MIB,
                "%.2f" % (median(wires) / MIB) if wires else "-"))
        thin = median([r["seconds"] for r in records["thin"]])
        full = median([r["seconds"] for r in records["full"]])
        app = results["app_layer"][label]
        sent = max([r["body_bytes"] for r in records["thin"]] +
                   [r["wire_bytes"] for r in records["thin"] if r["wire_bytes"] is not None])
        checks.append(("%s %s: thin bytes <= app layer + 1 MiB" % (link, label),
                       sent <= app + THIN_TARGETS["thin_extra_bytes"],
                       "%.2f MiB, app layer %.2f MiB" % (sent / MIB, app / MIB)))
        if link == "loopback":
            checks.append(("loopback %s: thin no slower than full" % label, thin <= full,
                           "%.2f s vs %.2f s" % (thin, full)))
        elif label == "256m":
            checks.append(("%s 256m: thin <= %.2f x full" % (link, THIN_TARGETS["shaped_ratio"]),
                           thin <= THIN_TARGETS["shaped_ratio"] * full, "%.3f" % (thin / full)))
    for label, overhead in results["overhead"].items():
        ratio = median([c / b for c, b in zip(overhead["client"], overhead["bare"])])
        out.append("client at %s: docker save > /dev/null %s s; edd push's save + filter %s s"
                   % (label, spread(overhead["bare"]), spread(overhead["client"])))
        checks.append(("client overhead at %s <= %.1f x docker save" % (
            label, THIN_TARGETS["overhead"]), ratio <= THIN_TARGETS["overhead"], "%.2f" % ratio))
    out += ["", "Targets (issue 12)"]
    out += ["  %-6s %-48s %s" % ("ok" if met else "MISSED", target, measured)
            for target, met, measured in checks]
    return "\n".join(out)


def loadavg():
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


def thin_bench(args, cleanup, workdir, scratch, methods):
    """Issue 12's benchmark; see the comment at the top of this section."""
    if shutil.which("tc") is None and not args.no_shaping:
        raise BenchError("tc is not installed (iproute2); or pass --no-shaping")
    bases = [256 * MIB] + ([GIB] if args.full else [])
    edd, sshd, machine = start_servers(args, cleanup, scratch, methods)
    results = {"runs": {}, "app_layer": {}, "overhead": {}, "loadavg": [loadavg()]}
    ssh_app_port = free_port()
    cleanup.callback(docker, "rm", "-f", SSH_CONTAINER, check=False)
    for base in bases:
        label = size_label(base).lower()
        progress("%s: building v1 and v2" % label)
        pair = LayeredPair(workdir, base, methods)
        results["app_layer"][label] = pair.app_layer
        runs = ThinRuns(methods, pair, args,
                        pair.client_docker(os.path.join(scratch, "client-bin")), ssh_app_port)
        runs.start()
        results["runs"][("loopback", label)] = measure_thin(runs, args.rounds,
                                                            "loopback " + label)
        if not args.no_shaping:
            with shaped_uplink([edd.port, sshd.port], UPLINK_RATE) as wire_bytes:
                results["runs"][(UPLINK_RATE, label)] = measure_thin(
                    runs, args.rounds, UPLINK_RATE + " " + label, wire_bytes)
        runs.reset()
        progress("%s: client overhead" % label)
        results["overhead"][label] = measure_client_overhead(pair, args.rounds,
                                                             os.path.abspath(args.edd))
        results["loadavg"].append(loadavg())
    print(thin_report(results, args.rounds, machine))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(results, machine=machine, runs={
                "%s %s" % key: value for key, value in results["runs"].items()}), file, indent=1)
    return 0


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def machine_line(python, sshd):
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), "?")
    engine = docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    python_version = run([python, "-c", "import platform; print(platform.python_version())"]
                         ).stdout.strip()
    curl = run(["curl", "--version"]).stdout.split()[1]
    ssh = run(["ssh", "-V"]).stderr.split(",")[0].strip()
    return ("machine: %s, %d cores, Linux %s; docker %s; edd on Python %s; curl %s; %s (%s)"
            % (cpu, os.cpu_count(), platform.release(), engine, python_version, curl, ssh,
               sshd.cipher))


def median(values):
    return statistics.median(values)


def ratios(runs):
    """(edd/local, edd/ssh): the medians of the per-round ratios."""
    seconds = {name: [r["seconds"] for r in records] for name, records in runs.items()}
    return tuple(median([e / other for e, other in zip(seconds["edd"], seconds[name])])
                 for name in ("local", "ssh"))


def transfer_lines(results, rounds):
    lines = ["Push and deploy, cold, %d rounds in rotating order; seconds are medians, "
             "ratios the median of per-round ratios" % rounds,
             "%-6s %7s %7s %7s %10s %8s %9s %9s %7s %10s"
             % ("size", "local", "edd", "ssh", "edd/local", "edd/ssh",
                "edd recv", "edd swap", "gate", "edd MiB/s")]
    for size, runs in results["transfer"].items():
        seconds = {name: median([r["seconds"] for r in records])
                   for name, records in runs.items()}
        phases = [r["phases"] for r in runs["edd"] if r["phases"]]

        def phase(key):
            values = [p[key] for p in phases if p[key] is not None]
            return median(values) if values else float("nan")
        lines.append("%-6s %7.2f %7.2f %7.2f %10.2f %8.2f %9.2f %9.2f %7.3f %10.0f" % (
            (size_label(size), seconds["local"], seconds["edd"], seconds["ssh"])
            + ratios(runs) + (phase("receive"), phase("swap"), phase("gate"),
                              size / MIB / seconds["edd"])))
    lines += ["  (edd recv = request start to `docker load` done; swap = the rest: docker "
              "calls, run, gate; gate = the health gate's own wait, settle 0)", "",
              "Whole-machine busy CPU seconds per run (median; all processes, both cores):"]
    for size, runs in results["transfer"].items():
        lines.append("  %-6s %s" % (size_label(size), ", ".join(
            "%s %.2f" % (name, median([r["machine_cpu"] for r in records]))
            for name, records in runs.items())))
    return lines


def peak_rss(results):
    return {size: max(r["rss"] for r in runs["edd"])
            for size, runs in results["transfer"].items()}


def process_lines(results):
    peak = peak_rss(results)
    largest = max(peak)
    big = results["transfer"][largest]["edd"]
    return [
        "edd process: RSS idle %.1f MiB; peak during push %s" % (results["rss_idle"], ", ".join(
            "%s %.1f MiB" % (size_label(size), rss) for size, rss in peak.items())),
        "edd CPU per GiB pushed (at %s): edd %.2f s, its docker CLI children %.2f s" % (
            size_label(largest), median([r["cpu"] / r["bytes"] * GIB for r in big]),
            median([r["children_cpu"] / r["bytes"] * GIB for r in big]))]


def latency_lines(results):
    small, gets, metrics_gets = results["small"], results["gets"], results["metrics_gets"]
    gaps, stops, plain = results["gaps"], results["stops"], results["plain_gaps"]

    def p50_p90(values, unit=1.0):
        return percentile(values, 50) * unit, percentile(values, 90) * unit
    return [
        "small push (%d MiB, curl -T -), end to end: replacing a running container p50 %.2f s "
        "p90 %.2f s (n=%d);" % ((SMALL_SIZE // MIB,) + p50_p90(small["swaps"])
                                + (len(small["swaps"]),)),
        "  first deploy p50 %.2f s p90 %.2f s (n=%d); for reference, local docker load + run "
        "of it p50 %.2f s" % (p50_p90(small["fresh"]) + (len(small["fresh"]),
                                                         percentile(small["local"], 50))),
        "GET /v1/deployments/%s, fresh mTLS connection each: p50 %.1f ms, p90 %.1f ms (n=%d)"
        % ((DEPLOYMENT,) + p50_p90(gets, 1000) + (len(gets),)),
        "  for reference, GET /metrics (no docker command): p50 %.1f ms, p90 %.1f ms"
        % p50_p90(metrics_gets, 1000),
        "redeploy downtime (probe every %d ms; longest time without an answer): median %.2f s, "
        "max %.2f s (n=%d);" % (PROBE_INTERVAL * 1000, median(gaps), max(gaps), len(gaps)),
        "  the container's own docker stop: median %.2f s; for reference, docker stop, rm, "
        "run without edd: median %.2f s, max %.2f s" % (median(stops), median(plain),
                                                          max(plain))]


def target_checks(results):
    """[(target, met, measured)] for the targets of issue 5."""
    checks = []
    for size, runs in results["transfer"].items():
        ratio_local, ratio_ssh = ratios(runs)
        if size >= 256 * MIB:
            checks.append(("edd/local at %s <= %.2f" % (size_label(size), TARGETS["ratio_local"]),
                           ratio_local <= TARGETS["ratio_local"], "%.2f" % ratio_local))
        checks.append(("edd/ssh at %s <= %.2f" % (size_label(size), TARGETS["ratio_ssh"]),
                       ratio_ssh <= TARGETS["ratio_ssh"], "%.2f" % ratio_ssh))
    peak = peak_rss(results)
    smallest, largest = min(peak), max(peak)
    spread = peak[largest] - peak[smallest]
    swap_p50 = percentile(results["small"]["swaps"], 50)
    get_p50 = percentile(results["gets"], 50) * 1000
    gaps, plain = results["gaps"], results["plain_gaps"]
    allowed = median(results["stops"]) + TARGETS["downtime_extra_s"]
    return checks + [
        ("peak RSS at %s <= %.0f MiB" % (size_label(largest), TARGETS["rss_mib"]),
         peak[largest] <= TARGETS["rss_mib"], "%.1f MiB" % peak[largest]),
        ("peak RSS %s vs %s within %.0f MiB" % (size_label(smallest), size_label(largest),
                                                TARGETS["rss_flat_mib"]),
         abs(spread) <= TARGETS["rss_flat_mib"], "%+.1f MiB" % spread),
        ("small push p50 <= %.1f s (replacing a container)" % TARGETS["small_push_s"],
         swap_p50 <= TARGETS["small_push_s"], "%.2f s" % swap_p50),
        ("GET p50 <= %.0f ms" % TARGETS["get_p50_ms"], get_p50 <= TARGETS["get_p50_ms"],
         "%.1f ms" % get_p50),
        ("downtime <= stop time + %.1f s = %.2f s" % (TARGETS["downtime_extra_s"], allowed),
         median(gaps) <= allowed, "%.2f s (median), %.2f s (max); without edd %.2f s"
         % (median(gaps), max(gaps), median(plain))),
    ]


def report(results, rounds, machine):
    background = max(results["background"])
    out = [machine,
           "other load: %.2f cores busy when the bench was idle (max of %d 1-s samples)%s"
           % (background, len(results["background"]),
              "; the figures below are disturbed" if background > 0.1 else ""), ""]
    out += transfer_lines(results, rounds) + [""]
    out += process_lines(results) + latency_lines(results) + ["", "Targets (issue 5)"]
    out += ["  %-6s %-48s %s" % ("ok" if met else "MISSED", target, measured)
            for target, met, measured in target_checks(results)]
    return "\n".join(out)


def breakdown(results):
    """The docker commands of edd's last push of the largest size and of its last
    small push that replaced a container, each with its duration."""
    lines = []
    largest = max(results["transfer"])
    for title, phases in (
            ("last %s push (no container before)" % size_label(largest),
             results["transfer"][largest]["edd"][-1]["phases"]),
            ("last small push replacing a container", results["small"]["swap_phases"])):
        if phases:
            lines.append("edd's docker commands, %s (start to next start):" % title)
            lines += ["  %7.3f s  %s" % (seconds, command)
                      for command, seconds in phases["steps"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark edd against docker load, locally and "
                                     "over ssh (see the module docstring).")
    parser.add_argument("--sizes", type=lambda text: [parse_size(s) for s in text.split(",")],
                        help="image sizes, e.g. 64M,256M,1G (default 64M,256M)")
    parser.add_argument("--full", action="store_true",
                        help="also push a 1 GiB image (with --thin: also a 1 GiB base)")
    parser.add_argument("--thin", action="store_true",
                        help="instead, issue 12's benchmark: redeploying v2 over v1 with "
                             "edd push, curl and ssh, on loopback and a 100 Mbit/s uplink")
    parser.add_argument("--no-shaping", action="store_true",
                        help="with --thin: skip the simulated uplink (which needs tc)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="cold runs of each method per size (default 5)")
    parser.add_argument("--small-pushes", type=int, default=10,
                        help="small pushes timed (default 10)")
    parser.add_argument("--gets", type=int, default=30, help="GETs timed (default 30)")
    parser.add_argument("--swaps", type=int, default=5,
                        help="redeploys watched by the prober (default 5)")
    parser.add_argument("--edd", default=EDD,
                        help="the edd.py to measure (default: the repo's)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs edd (default: this one)")
    parser.add_argument("--workdir",
                        help="keep archives here and reuse them next time (default: a "
                             "temporary folder, removed at the end)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write every measurement to FILE as JSON")
    parser.add_argument("--verbose", action="store_true",
                        help="also print edd's docker commands of the last large push")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [64 * MIB, 256 * MIB]
    if args.full:
        args.sizes.append(GIB)
    args.sizes = sorted(set(args.sizes))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def check_tools(args):
    for tool in ("docker", "curl", "openssl", "ssh", "ssh-keygen", "cat"):
        if shutil.which(tool) is None:
            raise BenchError("%s is not installed" % tool)
    for path in (SSHD, BUSYBOX, args.edd):
        if not os.path.exists(path):
            raise BenchError("%s is missing" % path)
    if os.geteuid() != 0:
        raise BenchError("run as root: sshd logs in as root, and edd runs docker")
    docker("info", "--format", "{{.ServerVersion}}", timeout=30)


def start_servers(args, cleanup, scratch, methods):
    """A PKI, sshd and edd for `methods`; return (edd, sshd, the machine line)."""
    pki = make_pki(os.path.join(scratch, "pki"))
    sshd = Sshd(os.path.join(scratch, "ssh"))
    cleanup.callback(sshd.stop)
    edd = Edd(scratch, pki, args.python, methods.app_port, os.path.abspath(args.edd))
    cleanup.callback(edd.stop)
    methods.edd, methods.sshd = edd, sshd
    machine = machine_line(args.python, sshd)
    if os.path.abspath(args.edd) != EDD:
        machine += "; measuring " + os.path.abspath(args.edd)
    progress(machine)
    return edd, sshd, machine


def bench(args, cleanup):
    check_tools(args)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        workdir = os.path.abspath(args.workdir)
    else:
        workdir = tempfile.mkdtemp(prefix="eddbench-")
        cleanup.callback(shutil.rmtree, workdir, True)
    scratch = tempfile.mkdtemp(prefix="run-", dir=workdir)
    cleanup.callback(shutil.rmtree, scratch, True)
    app_port = free_port()
    methods = Methods(app_port)
    cleanup.callback(methods.clean_up)
    if args.thin:
        return thin_bench(args, cleanup, workdir, scratch, methods)

    progress("building images in %s" % workdir)
    wanted = [("eddbench/small:v%d" % n, SMALL_SIZE, "eddbench small v%d\n" % n)
              for n in (1, 2)]
    wanted += [("eddbench/img:" + size_label(size).lower(), size,
                "eddbench %s\n" % size_label(size).lower()) for size in args.sizes]
    methods.tags.update(tag for tag, _, _ in wanted)
    for tag, size, page in wanted:
        methods.images.append(build_image(workdir, tag, size, page))
    small = methods.images[:2]
    large = dict(zip(args.sizes, methods.images[2:]))

    edd, sshd, machine = start_servers(args, cleanup, scratch, methods)

    progress("warm-up: one small deploy each way")
    for name in ("edd", "local", "ssh"):
        methods.cold()
        getattr(methods, "via_" + name)(small[0])
        expect_page(app_port, small[0].page)
    methods.cold()
    results = {"transfer": {}, "rss_idle": edd.rss_mib()}
    methods.background.append(MachineCpu.background())

    progress("small pushes")
    results["small"] = measure_small_pushes(methods, small, args.small_pushes)
    progress("GET latency")
    results["gets"] = measure_get(edd, args.gets)
    results["metrics_gets"] = measure_get(edd, args.gets, "/metrics")
    progress("redeploy downtime")
    results["gaps"] = measure_downtime(methods, small, args.swaps)
    methods.cold()
    results["plain_gaps"] = measure_plain_downtime(methods, small, args.swaps)
    results["stops"] = measure_stop_time(small[0], 5)
    methods.cold()

    for size in args.sizes:
        progress("%s: %d rounds of edd, local, ssh" % (size_label(size), args.rounds))
        results["transfer"][size] = measure_transfer(methods, large[size], size_label(size),
                                                     args.rounds, ["edd", "local", "ssh"])
    results["background"] = methods.background
    print(report(results, args.rounds, machine))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(results, machine=machine,
                           transfer={size_label(size): runs for size, runs
                                     in results["transfer"].items()},
                           ratios={size_label(size): ratios(runs) for size, runs
                                   in results["transfer"].items()}), file, indent=1)
    if args.verbose:
        print()
        print(breakdown(results))
    return 0


def main(argv=None):
    args = parse_args(argv)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)       # a closed terminal still cleans up
    try:
        with contextlib.ExitStack() as cleanup:
            return bench(args, cleanup)
    except BenchError as exc:
        print("\nBENCH FAILED: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
