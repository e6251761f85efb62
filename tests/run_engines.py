"""Run the suite once per engine, the engines side by side: `make test` calls this.

    python3 tests/run_engines.py [PYTEST ARGS...]

Most of an engine test's time is waiting (for a gate, a health check, docker),
not CPU, so a docker session and a podman session run well at once on two
cores: they share no engine, no container name and no image tag (each session
has its own run_tag). The last engine's session also runs the tests that need
no engine; the others run only their engine's tests (EDD_TEST_ENGINE_TESTS_ONLY=1,
see conftest.py), so nothing runs twice. (podman's engine tests are fewer: its
session has room for the rest.)

Each session's output is printed whole when it ends, then one line that adds
them up, "N passed, N failed" (with skipped and errors when there are any).
The exit status is the first non-zero one of the sessions, else 0 (an engine
session that finds no engine test to run, as for TESTS=tests/test_units.py, is 0).
"""

import os
import re
import subprocess
import sys
import tempfile
import time

COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def engines():
    names = os.environ.get("EDD_TEST_ENGINES", "docker,podman").split(",")
    return [name for name in names if name]


def start(engine, last, pytest_args, log):
    env = dict(os.environ, EDD_TEST_ENGINES=engine)
    if not last:
        env["EDD_TEST_ENGINE_TESTS_ONLY"] = "1"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + pytest_args
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def summary_counts(text):
    """{"passed": N, ...} from the last line of a pytest session's output."""
    lines = [line for line in text.splitlines() if line.strip()]
    counts = {}
    for number, word in COUNTS.findall(lines[-1] if lines else ""):
        word = "errors" if word.startswith("error") else word
        counts[word] = counts.get(word, 0) + int(number)
    return counts


def main(argv):
    pytest_args = argv or ["tests"]
    started = time.monotonic()
    sessions = []
    names = engines()
    for index, engine in enumerate(names):
        log = tempfile.TemporaryFile()
        sessions.append((engine, start(engine, index == len(names) - 1, pytest_args, log),
                         log))
    status, total = 0, {}
    for engine, process, log in sessions:
        code = process.wait()
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
        log.close()
        if code == 5 and engine != sessions[-1][0]:
            code = 0        # pytest's "no tests": the files asked for have no engine test
        print("=== %s session: exit %d" % (engine, code))
        print(text, end="" if text.endswith("\n") else "\n")
        status = status or code
        for word, number in summary_counts(text).items():
            total[word] = total.get(word, 0) + number
    print("=== %d sessions (%s) in %.0f s" % (len(sessions), ", ".join(e for e, _, _ in sessions),
                                           time.monotonic() - started))
    line = "%d passed, %d failed" % (total.get("passed", 0), total.get("failed", 0))
    for word in ("skipped", "errors"):
        if total.get(word):
            line += ", %d %s" % (total[word], word)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
