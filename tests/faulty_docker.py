#!/usr/bin/env python3
"""A docker CLI that fails on cue, for the faults the real engine cannot produce at will.

    faulty_docker.py CONTROL_DIR ARGS...

runs the real `docker ARGS...` unless a rule in CONTROL_DIR/rules.json says otherwise.
rules.json is a list of rules, read at every call:

    {"match": REGEX,            searched in the arguments joined by spaces
     "nth": 1,                  the first matching call that the rule acts on
     "times": 1,                how many matching calls from there on (-1: all)
     "armed_by": REGEX,         optional: count matches only after a call matching this
     "action": ACTION,
     "before": [ARGS...]}       optional: run the real `docker ARGS` first (any action)

ACTION is one of
    fail      exit 1 with a daemon-style error, without running docker
    hang      sleep (until the caller's timeout kills this process)
    after     run the real docker, then exit 1 anyway: done, but reported as failed
    detach    start the real docker in the background and exit 1 at once: reported as
              failed while the daemon goes on (a CLI that lost its connection)
    detach-hang  start the real docker in the background, then hang
    pass      run the real docker (with "before", to do something first)

Every call is appended to CONTROL_DIR/calls.log as "ACTION ARGS" (ACTION "-" when no
rule fired), so a test can prove that its fault really happened.
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time


def real_docker():
    here = os.path.realpath(sys.argv[0])
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(folder, "docker")
        if os.access(candidate, os.X_OK) and os.path.realpath(candidate) != here:
            return candidate
    return shutil.which("docker") or "docker"


def choose(control, args):
    """The rule that acts on this call (or None), counting matches under a file lock."""
    try:
        with open(os.path.join(control, "rules.json")) as file:
            rules = json.load(file)
    except FileNotFoundError:
        return None
    line = " ".join(args)
    with open(os.path.join(control, "counts.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counts_path = os.path.join(control, "counts.json")
        try:
            with open(counts_path) as file:
                counts = json.load(file)
        except (FileNotFoundError, ValueError):
            counts = {}
        chosen = None
        for index, rule in enumerate(rules):
            key = str(index)
            armed = counts.get(key + ".armed", not rule.get("armed_by"))
            if not armed:
                if re.search(rule["armed_by"], line):
                    counts[key + ".armed"] = True
                continue
            if chosen is None and re.search(rule["match"], line):
                counts[key] = seen = counts.get(key, 0) + 1
                first, times = rule.get("nth", 1), rule.get("times", 1)
                if seen >= first and (times < 0 or seen < first + times):
                    chosen = rule
        with open(counts_path, "w") as file:
            json.dump(counts, file)
    return chosen


def main():
    control, args = sys.argv[1], sys.argv[2:]
    docker = real_docker()
    rule = choose(control, args)
    action = rule["action"] if rule else "-"
    with open(os.path.join(control, "calls.log"), "a") as calls:
        calls.write("%s %s\n" % (action, " ".join(args)))
    if rule and rule.get("before"):
        subprocess.run([docker] + rule["before"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    if action == "fail":
        sys.stderr.write("Error response from daemon: injected fault\n")
        return 1
    if action == "hang":
        time.sleep(3600)
        return 1
    if action in ("detach", "detach-hang"):
        subprocess.Popen([docker] + args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        if action == "detach-hang":
            time.sleep(3600)
        sys.stderr.write("error during connect: injected fault (the daemon goes on)\n")
        return 1
    done = subprocess.run([docker] + args)
    if action == "after":
        sys.stderr.write("Error response from daemon: injected fault after success\n")
        return 1
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
