"""Memory under concurrency (issue 16): edd tunes glibc's malloc at start-up.

glibc gives each new thread its own arena and keeps what was freed in it, and it
raises its mmap threshold after a large free; with a thread per connection and a
1 MiB upload buffer that kept RSS megabytes above the target. The bench measures
the RSS; these tests prove the settings take effect, from what glibc itself
reports (malloc_stats, mallinfo), and that edd starts with them.
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
print(edd.tune_malloc() if sys.argv[2] == "tune" else "untouched")
sys.stdout.flush()
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

# After a large block is freed, is a smaller one that is still far above 128 KiB
# mmap'd (mallinfo's hblks counts the mmap'd blocks)? glibc's dynamic threshold
# would put it in an arena. The smaller block is made larger than all the free
# space in the heap (importing edd leaves megabytes), which malloc would reuse
# before it thinks of mmap at all; the large one is twice that.
MMAP_PROBE = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
sys.dont_write_bytecode = True
import edd
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                .split()]
libc = ctypes.CDLL(None)
libc.mallinfo.restype = MallInfo
if sys.argv[2] == "tune":
    edd.tune_malloc()
size = max(1 << 20, libc.mallinfo().fordblks + (1 << 20))
upload_buffer = bytearray(2 * size)
del upload_buffer
before = libc.mallinfo().hblks
held = bytearray(size)
print(libc.mallinfo().hblks - before)
"""

needs_glibc = pytest.mark.skipif(not glibc_version(), reason="malloc tuning is glibc's")
ARENAS = dict((name, value) for name, _, value in edd.MALLOC_SETTINGS)["MALLOC_ARENA_MAX"]


def probe(script, mode):
    """(stdout, stderr) of `script` run by a fresh Python, with no MALLOC_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", script, str(REPO), mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, check=True)
    return done.stdout.strip(), done.stderr


@needs_glibc
def test_threads_share_two_arenas_once_tuned():
    out, stats = probe(ARENA_PROBE, "tune")
    assert out.splitlines()[0] == "['MALLOC_ARENA_MAX=2', 'MALLOC_MMAP_THRESHOLD_=131072']"
    assert ARENAS == 2 and 1 <= stats.count("Arena ") <= ARENAS, stats


@needs_glibc
def test_untuned_each_thread_gets_an_arena():
    # The control for the test above: the probe can tell the difference.
    out, stats = probe(ARENA_PROBE, "untouched")
    assert out.splitlines()[0] == "untouched"
    assert stats.count("Arena ") > ARENAS, stats


@needs_glibc
@pytest.mark.parametrize("mode, mmapped", [("tune", "1"), ("untouched", "0")])
def test_mmap_threshold_stays_fixed_after_a_large_free(mode, mmapped):
    assert probe(MMAP_PROBE, mode)[0] == mmapped


def test_environment_settings_win(monkeypatch):
    calls = []
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: FakeLibc(calls))
    assert edd.tune_malloc() == ["MALLOC_MMAP_THRESHOLD_=131072"]
    assert calls == [(-3, 128 << 10)]


class FakeLibc:
    """Records mallopt calls instead of changing this test process's malloc."""

    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


@pytest.mark.parametrize("confstr", [
    lambda name: (_ for _ in ()).throw(ValueError("unrecognized configuration name")),
    lambda name: None,
    lambda name: (_ for _ in ()).throw(OSError(22, "Invalid argument")),
])
def test_without_glibc_quietly_does_nothing(monkeypatch, confstr):
    # What musl answers: no such name, no value, or EINVAL.
    monkeypatch.setattr(os, "confstr", confstr)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert edd.tune_malloc() == []


def start_until_ready(pki, tmp_path, env_extra=()):
    """Run edd as systemd would (NOTIFY_SOCKET), wait for READY=1; return its log."""
    config = tmp_path / "edd.json"
    config.write_text(json.dumps({
        "listen": "127.0.0.1:%d" % free_port(), "server_cert": str(pki.server_cert),
        "server_key": str(pki.server_key), "client_ca": str(pki.ca), "deployments": []}))
    notify = tmp_path / "notify"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
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
def test_edd_starts_with_malloc_tuned(pki, tmp_path):
    log = start_until_ready(pki, tmp_path)
    assert "malloc tuned: MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072" in log, log
    assert "listening on" in log, log


def test_edd_leaves_an_operators_settings_alone(pki, tmp_path):
    log = start_until_ready(pki, tmp_path, {"MALLOC_ARENA_MAX": "4",
                                            "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert "malloc tuned: nothing" in log, log
    assert "listening on" in log, log
