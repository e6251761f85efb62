"""Memory under concurrency (issue 16): edd caps glibc's malloc arenas at start-up.

glibc gives each new thread its own arena and keeps what was freed in it; with a
thread per connection that kept RSS megabytes above the target. The bench measures
the RSS; these tests prove the cap is applied, by counting the arenas glibc itself
reports (malloc_stats), and that edd starts with it.
"""

import ctypes
import json
import os
import socket
import subprocess
import sys

import pytest

import edd
from conftest import EDD, REPO, free_port



def glibc_version():
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


# Eight threads each hold malloc'd memory at the same time (a barrier keeps them
# all alive), then glibc prints one "Arena N:" block per arena on stderr.
ARENA_PROBE = r"""
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
sys.dont_write_bytecode = True
import edd
print(edd.limit_malloc_arenas() if sys.argv[2] == "limit" else "untouched", flush=True)
barrier = threading.Barrier(9)
held = []
def work():
    held.append([bytearray(50000) for _ in range(4)])   # malloc, below the mmap threshold
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
barrier.wait()
ctypes.CDLL(None).malloc_stats()
barrier.wait()
for thread in threads:
    thread.join()
"""

needs_glibc = pytest.mark.skipif(not glibc_version(), reason="malloc arenas are glibc's")


def arenas_with(mode):
    """(what limit_malloc_arenas returned, arenas glibc reports) in a fresh Python."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", ARENA_PROBE, str(REPO), mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, check=True)
    return done.stdout.strip(), done.stderr.count("Arena ")


@needs_glibc
def test_threads_share_two_arenas_once_limited():
    returned, arenas = arenas_with("limit")
    assert returned == "True"
    assert 1 <= arenas <= edd.MALLOC_ARENAS


@needs_glibc
def test_without_the_limit_each_thread_gets_an_arena():
    # The control for the test above: the probe can tell the difference.
    returned, arenas = arenas_with("none")
    assert returned == "untouched"
    assert arenas > edd.MALLOC_ARENAS


def test_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert edd.limit_malloc_arenas() is False


@pytest.mark.parametrize("confstr", [
    lambda name: (_ for _ in ()).throw(ValueError("unrecognized configuration name")),
    lambda name: None,
    lambda name: (_ for _ in ()).throw(OSError(22, "Invalid argument")),
])
def test_without_glibc_quietly_does_nothing(monkeypatch, confstr):
    # What musl answers: no such name, no value, or EINVAL.
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(os, "confstr", confstr)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert edd.limit_malloc_arenas() is False


def start_until_ready(pki, tmp_path, env_extra=()):
    """Run edd as systemd would (NOTIFY_SOCKET), wait for READY=1; return its log."""
    config = tmp_path / "edd.json"
    config.write_text(json.dumps({
        "listen": "127.0.0.1:%d" % free_port(), "server_cert": str(pki.server_cert),
        "server_key": str(pki.server_key), "client_ca": str(pki.ca), "deployments": []}))
    notify = tmp_path / "notify"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(env_extra, NOTIFY_SOCKET=str(notify))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(30)
        proc = subprocess.Popen([sys.executable, str(EDD), "--config", str(config),
                                 "--log-level", "debug"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            messages = []
            while not any(m.startswith(b"READY=1") for m in messages):
                messages.append(sock.recv(4096))
        finally:
            proc.terminate()
            log = proc.communicate(timeout=30)[1].decode("utf-8", "replace")
    assert proc.returncode == 0, log
    return log


@needs_glibc
def test_edd_starts_with_arenas_limited(pki, tmp_path):
    log = start_until_ready(pki, tmp_path)
    assert "malloc arenas limited to %d" % edd.MALLOC_ARENAS in log, log
    assert "listening on" in log, log


def test_edd_leaves_an_operators_setting_alone(pki, tmp_path):
    log = start_until_ready(pki, tmp_path, {"MALLOC_ARENA_MAX": "4"})
    assert "malloc arenas limited" not in log, log
    assert "listening on" in log, log
