"""`edd.py push IMAGE URL URL…`: a rollout over several hosts (issue 13).

Each "host" is an edd daemon of its own on loopback, with its own config and
deployment, all on the test's engine (docker or podman; the client always saves
from this machine's docker, as a user's laptop would). The images share a base, as
builds do (test_push's build_layered). v2's command exits at once when the
environment variable REFUSE_ENV is set, and only the failing target's `args`
set it (`-e`), so v2 fails the gate on that target alone.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (EDD, ENGINE, PROMPT_STOP_CMD, fetch, free_port, https_request,
                      is_podman, run_tag, unreachable)
from test_deploy import send_half_an_upload
from test_push import build_layered, edd as edd_module

REFUSE_ENV = "EDD_TEST_REFUSE_V2"
V2_CMD = ["/bin/busybox", "sh", "-c",
          '[ -n "$%s" ] && echo "v2 will not run where %s is set" && exit 3; %s'
          % (REFUSE_ENV, REFUSE_ENV, PROMPT_STOP_CMD[-1])]


@pytest.fixture(scope="module")
def images():
    """{"v0", "v1", "v2"}: tags of images sharing one base; v2 fails under REFUSE_ENV.
    They are built in this machine's docker, which the client pushes from, whatever
    engine the hosts (edd_factory's daemons) use."""
    tags = {key: run_tag("rollout-" + key, "t") for key in ("base", "v0", "v1", "v2")}
    engine, ENGINE["cli"] = ENGINE["cli"], "docker"     # build_layered's docker_cli calls
    try:
        build_layered(tags["base"], [(tags["v0"], "rollout v0\n", PROMPT_STOP_CMD),
                                     (tags["v1"], "rollout v1\n", PROMPT_STOP_CMD),
                                     (tags["v2"], "rollout v2\n", V2_CMD)])
    finally:
        ENGINE["cli"] = engine
    yield tags
    subprocess.run(["docker", "rmi"] + list(tags.values()), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


class Fleet:
    """Edd daemons with one deployment each; .url(i), .page(i), .image_id(i)."""

    def __init__(self, edd_factory, count, failing=(), **settings):
        self.pki = edd_factory.pki
        self.members = []
        for index in range(count):
            args = ["-e", REFUSE_ENV + "=1"] if index in failing else []
            deployment = edd_factory.deployment(args=args, **settings)
            self.members.append((edd_factory.start([deployment]), deployment))

    def url(self, index):
        server, deployment = self.members[index]
        return "%s/v1/deployments/%s" % (server.url, deployment.name)

    def urls(self):
        return [self.url(i) for i in range(len(self.members))]

    def page(self, index):
        return fetch(self.members[index][1].port)

    def image_id(self, index):
        server, deployment = self.members[index]
        reply = https_request(server, "GET", "/v1/deployments/%s" % deployment.name)
        assert reply.status == 200, reply.body
        return reply.json["image_id"]

    def push(self, image, *arguments, timeout=300):
        """Run `edd.py push` as a user would; (exit status, JSON or None, stdout, stderr)."""
        proc = subprocess.run(self.argv(image, *arguments), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = None
        return proc.returncode, report, proc.stdout, proc.stderr

    def argv(self, image, *arguments):
        crt, key = self.pki.client("alice")
        return [sys.executable, str(EDD), "push", "--cert", str(crt), "--key", str(key),
                "--cacert", str(self.pki.ca), image] + [str(a) for a in arguments]


def outcomes(report):
    return [entry["outcome"] for entry in report]


def on_v1(fleet, images):
    """Roll v1 out to the whole fleet."""
    status, report, out, err = fleet.push(images["v1"], "--json", *fleet.urls())
    assert status == 0, (out, err)
    assert outcomes(report) == ["deployed"] * len(fleet.members), report
    assert len({entry["after"] for entry in report}) == 1, report
    for index in range(len(fleet.members)):
        assert fleet.page(index) == "rollout v1\n"


# ---------------------------------------------------------------------------
# The promise: a failed deploy rolls the fleet back to one version
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_a_target_failing_v2_stops_the_rollout_and_every_target_serves_v1(
        edd_factory, images):
    fleet = Fleet(edd_factory, 3, failing={1})
    # The first target runs v0 before v1, so v0 is its `previous` when v2 comes:
    # the rollback must restore v1, what it ran before this push, not v0.
    status, _, out, err = fleet.push(images["v0"], fleet.url(0))
    assert status == 0, (out, err)
    on_v1(fleet, images)
    v1 = [fleet.image_id(i) for i in range(3)]

    status, _, out, err = fleet.push(images["v2"], *fleet.urls())
    assert status == 1, (out, err)
    lines = out.splitlines()
    assert lines[0].split() == ["TARGET", "BEFORE", "AFTER", "OUTCOME", "SENT", "SECONDS"]
    short = v1[0].split(":")[1][:12]
    assert lines[1].split()[:5] == [fleet.url(0), short, short, "rolled", "back"], out
    assert lines[2].split()[:6] == [fleet.url(1), short, short, "failed", "and", "restored"]
    assert lines[3].split()[:5] == [fleet.url(2), short, short, "not", "attempted"], out
    assert "every target runs the image it ran before this push" in err, err
    assert "v2 will not run where %s is set" % REFUSE_ENV in err, err    # the failed log
    for index in range(3):
        assert fleet.page(index) == "rollout v1\n"
        assert fleet.image_id(index) == v1[index]


@pytest.mark.docker
def test_rollback_puts_back_no_container_and_a_stopped_one(edd_factory, images):
    fleet = Fleet(edd_factory, 3, failing={2})
    status, _, out, err = fleet.push(images["v1"], fleet.url(1), fleet.url(2))
    assert status == 0, (out, err)
    server, deployment = fleet.members[1]
    assert https_request(server, "POST", "/v1/deployments/%s/stop" % deployment.name
                         ).status == 200
    v1 = fleet.image_id(1)
    status, report, out, err = fleet.push(images["v2"], "--json", *fleet.urls())
    assert status == 1, (out, err)
    assert outcomes(report) == ["rolled back", "rolled back", "failed and restored"], report
    assert [(entry["before"], entry["after"]) for entry in report] == [(None, None), (v1, v1),
                                                                        (v1, v1)]
    states = [https_request(server, "GET", "/v1/deployments/%s" % deployment.name).json
              for server, deployment in fleet.members]
    assert [state["state"] for state in states] == ["absent", "exited", "running"]
    assert unreachable(fleet.members[0][1].port) and unreachable(fleet.members[1][1].port)
    assert fleet.page(2) == "rollout v1\n"


@pytest.mark.docker
def test_no_rollback_leaves_the_targets_already_updated_on_v2(edd_factory, images):
    fleet = Fleet(edd_factory, 3, failing={1})
    on_v1(fleet, images)
    status, report, out, err = fleet.push(images["v2"], "--json", "--no-rollback",
                                          *fleet.urls())
    assert status == 1, (out, err)
    assert outcomes(report) == ["deployed", "failed and restored", "not attempted"], report
    assert report[0]["after"] != report[0]["before"] == report[1]["after"]
    assert "left mixed (--no-rollback): %s changed" % fleet.url(0).split("//")[1].replace(
        "/v1/deployments", "") in err, err
    assert [fleet.page(i) for i in range(3)] == ["rollout v2\n", "rollout v1\n",
                                                 "rollout v1\n"]


@pytest.mark.docker
def test_parallel_rollout_saves_once_and_sends_each_target_only_what_it_lacks(
        edd_factory, images, tmp_path):
    fleet = Fleet(edd_factory, 3)
    # Only the first target runs v0 beforehand; the others have nothing. v1 then
    # goes thin to the first (it has the base) and whole to the others.
    assert fleet.push(images["v0"], fleet.url(0))[0] == 0
    # Not a fault: a pass-through wrapper that counts the client's `docker save`s.
    calls = tmp_path / "calls"
    wrapper = tmp_path / "bin" / "docker"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\necho "$1" >> %s\nexec %s "$@"\n'
                       % (calls, subprocess.check_output(["which", "docker"],
                                                         universal_newlines=True).strip()))
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH="%s:%s" % (wrapper.parent, os.environ["PATH"]))
    proc = subprocess.run(fleet.argv(images["v1"], "--json", "--parallel", "3", *fleet.urls()),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert outcomes(report) == ["deployed"] * 3
    assert calls.read_text().split().count("save") == 1
    whole = report[1]["bytes_sent"]
    assert report[2]["bytes_sent"] == whole
    if is_podman():         # podman loads no archive without layers ("thin": false)
        assert report[0]["bytes_sent"] == whole, report
    else:
        assert report[0]["bytes_sent"] < whole / 4, report      # the base stayed home
    assert [fleet.page(i) for i in range(3)] == ["rollout v1\n"] * 3
    # The same push again: nothing to send anywhere.
    status, report, out, err = fleet.push(images["v1"], "--json", "--parallel", "2",
                                          *fleet.urls())
    assert status == 0 and outcomes(report) == ["already running"] * 3, (out, err)
    assert sum(entry["bytes_sent"] for entry in report) == 0


# ---------------------------------------------------------------------------
# Preflight: nothing changes anywhere unless every target answers
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_an_unreachable_target_in_preflight_changes_nothing(edd_factory, images, tmp_path):
    fleet = Fleet(edd_factory, 2)
    on_v1(fleet, images)
    before = [fleet.image_id(i) for i in range(2)]
    nobody = "https://127.0.0.1:%d/v1/deployments/web" % free_port()
    targets = tmp_path / "targets"
    targets.write_text("# the fleet\n%s\n\n%s   # the new box\n%s\n"
                       % (fleet.url(0), nobody, fleet.url(1)))
    status, _, out, err = fleet.push(images["v2"], "--targets", targets)
    assert status == 2, (out, err)
    table = out.splitlines()
    assert table[0].split() == ["TARGET", "PREFLIGHT"]
    assert table[1].startswith(fleet.url(0)) and "ok: %s, running" % before[0][7:19] in table[1]
    assert table[2].startswith(nobody) and "cannot connect to 127.0.0.1" in table[2], out
    assert table[3].startswith(fleet.url(1)) and "ok:" in table[3]
    assert "nothing was changed anywhere: the preflight failed" in err
    assert [fleet.image_id(i) for i in range(2)] == before
    assert [fleet.page(i) for i in range(2)] == ["rollout v1\n"] * 2


@pytest.mark.docker
def test_a_busy_target_gets_409_in_preflight(edd_factory, images, tmp_path):
    fleet = Fleet(edd_factory, 2)
    on_v1(fleet, images)
    before = [fleet.image_id(i) for i in range(2)]
    archive = tmp_path / "v1.tar"
    subprocess.run(["docker", "save", "-o", str(archive), images["v1"]], check=True)
    server, deployment = fleet.members[1]
    sock = send_half_an_upload(server, deployment, archive, timeout=60)   # another push
    try:
        status, report, out, err = fleet.push(images["v2"], "--json", *fleet.urls())
    finally:
        sock.close()
    assert status == 2, (out, err)
    assert outcomes(report) == ["not attempted"] * 2
    assert "preflight" not in report[0]
    assert report[1]["preflight"].startswith("the host answered 409: deployment %r is busy"
                                             % deployment.name), report
    assert [fleet.image_id(i) for i in range(2)] == before
    assert [fleet.page(i) for i in range(2)] == ["rollout v1\n"] * 2


# ---------------------------------------------------------------------------
# Interrupted: the host finishes by itself, the client starts nothing new
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_sigint_mid_rollout_starts_no_new_target_and_reports_each(edd_factory, images):
    fleet = Fleet(edd_factory, 2, settle_seconds=6)
    on_v1(fleet, images)
    proc = subprocess.Popen(fleet.argv(images["v2"], *fleet.urls()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    server, deployment = fleet.members[0]
    deadline = time.monotonic() + 60
    while fleet.page(0) != "rollout v2\n":        # uploaded: the host gates v2 (6 s)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    assert "load by alice" in _busy_with(server, deployment)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    lines = out.splitlines()
    assert lines[1].split()[3:5] == ["in", "flight"], out
    assert lines[2].split()[3:5] == ["not", "attempted"], out
    assert "interrupted" in err and "finishes or restores this deploy by itself" in err, err
    # The host did not need the client: its deploy of v2 completes.
    deadline = time.monotonic() + 60
    while _busy_with(server, deployment):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert [fleet.page(i) for i in range(2)] == ["rollout v2\n", "rollout v1\n"]


def _busy_with(server, deployment):
    """The 409 message of a /layers request, or "" when the deployment is free."""
    reply = https_request(server, "POST", "/v1/deployments/%s/layers" % deployment.name,
                          body='{"layers": []}', headers={"Content-Type": "application/json"})
    return reply.json.get("error", "") if reply.status == 409 else ""


# ---------------------------------------------------------------------------
# Without an engine: arguments, the targets file, the report
# ---------------------------------------------------------------------------

def test_targets_file_lines_and_comments(tmp_path):
    path = tmp_path / "targets"
    path.write_text("# web\nhttps://a:1/v1/deployments/w  # first\n\n  \n"
                    "https://b/v1/deployments/w\n#https://c/v1/deployments/w\n")
    assert edd_module.read_targets(str(path)) == ["https://a:1/v1/deployments/w",
                                                  "https://b/v1/deployments/w"]


@pytest.mark.parametrize("arguments, says", [
    (["img", "https://a/v1/deployments/w", "https://a:8866/v1/w"], "named twice: a:8866/w"),
    (["img", "--targets", "/nonexistent/targets"], "--targets /nonexistent/targets: cannot"),
    (["img", "https://a/v1/deployments/w", "http://b/v1/deployments/w"], "URL must look"),
    (["img", "--parallel", "0", "https://a/v1/w", "https://b/v1/w"], "--parallel must be"),
])
def test_bad_rollout_arguments_are_one_line_and_exit_2(arguments, says, pki):
    crt, key = pki.client("alice")
    proc = subprocess.run([sys.executable, str(EDD), "push", "--cert", str(crt), "--key",
                           str(key)] + arguments, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_fleet_summary_says_back_or_mixed():
    host = edd_module.Host(edd_module.parse_target("https://a/v1/deployments/w"), None)
    step = lambda outcome, before, after: edd_module.Step(
        "u", host, before=before, after=after, outcome=outcome)
    options = type("Options", (), {"no_rollback": False})
    back = [step("rolled back", "v1", "v1"), step("failed and restored", "v1", "v1")]
    assert edd_module.fleet_summary(back, options, False) == (
        "the deploy to a:8866/w failed; every target runs the image it ran before this push")
    mixed = [step("rollback failed", "v1", "v2"), step("failed and restored", "v1", "v1")]
    assert "left mixed: a:8866/w changed" in edd_module.fleet_summary(mixed, options, False)
    done = [step("deployed", "v1", "v2"), step("already running", "v2", "v2")]
    assert edd_module.fleet_summary(done, options, False) == "all 2 targets run the new image"
