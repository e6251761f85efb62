"""The swap keeps its promise when docker itself fails (issue 10), against the real engine.

After a push either the new image runs and passed its gate, or the old container runs
exactly as before (same container ID, same name, same state, same `current` tag) and
the answer says `restored: true`; otherwise the answer says `restored: false`. Every
test fetches what the deployment serves and checks that the answer matches it.

Faults the engine cannot produce on cue (a docker call that fails once, hangs, or
reports failure after or while the daemon did the work) come from tests/faulty_docker.py,
given to edd as its `docker`; each such test says which real-world fault it stands for
and checks in the wrapper's call log that the fault really fired. Crash loops, slow
stops, two edd processes and a crashed edd use the engine and edd as they are.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import edd as edd_module
from conftest import (assert_ok, push, push_until_parked, EDD, FAILING_CHECK, HTTPD_CMD, container_state, curl, docker_cli, fetch,
                      https_request, image_id, run_tag, unreachable, wait_for)

pytestmark = pytest.mark.docker

V1, V2, V3 = (run_tag("edd-test-faults", v) for v in ("v1", "v2", "v3"))
V1_TEXT, V2_TEXT, V3_TEXT = "faults v1\n", "faults v2\n", "faults v3\n"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def images(make_image):
    """v1, v2, v3 serving their text, an image that exits at once, and one that serves
    but fails its HEALTHCHECK."""
    class Images:
        v1 = make_image(V1, content=V1_TEXT)
        v2 = make_image(V2, content=V2_TEXT)
        v3 = make_image(V3, content=V3_TEXT)
        exits = make_image(run_tag("edd-test-faults-exits"), exits=True)
        unhealthy = make_image(run_tag("edd-test-faults-unhealthy"), content="unhealthy\n",
                               healthcheck=FAILING_CHECK)
        id = staticmethod(make_image.image_id)
    return Images


def container_id(name):
    proc = docker_cli("inspect", "--type", "container", "--format", "{{.Id}}", name,
                      check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def current(deployment, which="current"):
    return image_id("edd/%s:%s" % (deployment.name, which))


def started(edd_factory, images, faulty_docker=None, archive=None, **settings):
    """An edd (docker: the wrapper, if given) whose one deployment serves v1."""
    deployment = edd_factory.deployment(**settings)
    toplevel = {"docker": str(faulty_docker.path)} if faulty_docker else {}
    edd = edd_factory.start([deployment], **toplevel)
    assert_ok(push(edd, deployment, archive or images.v1))
    assert fetch(deployment.port) == V1_TEXT
    return edd, deployment


def assert_restored(reply, deployment, old_id, v1_id, state="running"):
    """The answer says restored, and it is: the same container, under its name, in its
    state, with its image current and nothing parked; v1 serves if it ran before."""
    assert not 200 <= reply.status < 300, reply
    assert reply.json and reply.json.get("restored") is True, reply.json
    assert container_id(deployment.name) == old_id
    assert container_state(deployment.name) == state
    assert container_state(deployment.name + ".edd-old") is None
    assert current(deployment) == v1_id
    if state == "running":
        assert fetch(deployment.port) == V1_TEXT
    assert reply.json["deployment"]["image_id"] == v1_id, reply.json


def fired(faulty_docker, action):
    calls = faulty_docker.calls(action)
    assert calls, "the injected fault never fired: %s" % faulty_docker.calls()
    return calls


def kill_mid_gate(edd_factory, deployment, archive, wait_for_name, state="running"):
    """Start edd with an 8 s gate, push `archive`, and SIGKILL edd once `wait_for_name`
    is in `state` (None: exists at all; a parked container runs only for the moment
    between its rename and its stop). Return the killed Edd."""
    slow = dict(deployment, settle_seconds=8)
    crashing = edd_factory.start([slow])
    threading.Thread(target=push, args=(crashing, deployment, archive), daemon=True).start()
    try:
        wait_for(lambda: (container_state(wait_for_name) is not None if state is None
                          else container_state(wait_for_name) == state), timeout=30,
                 message="%s to be %s" % (wait_for_name, state or "there"))
    except AssertionError as exc:
        raise AssertionError("%s; edd's log:\n%s" % (exc, crashing.log())) from None
    time.sleep(0.5)
    crashing.kill()
    return crashing


def metric_value(edd, name, **labels):
    body = https_request(edd, "GET", "/metrics").body
    wanted = ",".join('%s="%s"' % item for item in sorted(labels.items()))
    match = re.search(r"^%s\{%s\} (\S+)$" % (re.escape(name), re.escape(wanted)), body, re.M)
    return float(match.group(1)) if match else 0.0


# ---------------------------------------------------------------------------
# Undo steps that fail: retried, verified, and reported as observed
# ---------------------------------------------------------------------------

def test_rename_back_failing_once_is_retried(edd_factory, images, faulty_docker):
    # Stands for a transient daemon error ("context deadline exceeded") on the
    # rename that puts the old container back under its name.
    edd, deployment = started(edd_factory, images, faulty_docker)
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    faulty_docker.set({"match": r"^rename \S+ %s$" % re.escape(deployment.name),
                       "action": "fail"})
    reply = push(edd, deployment, images.exits)
    fired(faulty_docker, "fail")
    assert_restored(reply, deployment, old_id, v1_id)


def test_start_of_old_failing_once_is_retried(edd_factory, images, faulty_docker):
    # Stands for a transient daemon error on the undo's `docker start` of the old
    # container (the second start of the push; the first starts the new one).
    edd, deployment = started(edd_factory, images, faulty_docker)
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    faulty_docker.set({"match": r"^start ", "nth": 2, "action": "fail"})
    reply = push(edd, deployment, images.exits)
    fired(faulty_docker, "fail")
    assert_restored(reply, deployment, old_id, v1_id)


def test_rm_of_new_failing_once_never_starts_the_new_one(edd_factory, images,
                                                         faulty_docker):
    # Stands for a transient failure of `docker rm -f` on the failed new container.
    # The new image serves but fails its health check: had the undo started it
    # under the old name, its page would be what answers.
    edd, deployment = started(edd_factory, images, faulty_docker, health_timeout_seconds=10)
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    faulty_docker.set({"match": r"^rm -f ", "action": "fail"})
    reply = push(edd, deployment, images.unhealthy)
    fired(faulty_docker, "fail")
    assert_restored(reply, deployment, old_id, v1_id)


def test_undo_that_cannot_finish_says_restored_false(edd_factory, images, faulty_docker):
    # Stands for a daemon that refuses to remove the failed container for good
    # (e.g. a stuck overlay mount): the answer, the audit line and the metrics say
    # restored: false and show what runs; the record lets a restart finish the undo.
    edd, deployment = started(edd_factory, images, faulty_docker, health_timeout_seconds=10)
    v1_id, bad_id = images.id(images.v1), images.id(images.unhealthy)
    faulty_docker.set({"match": r"^rm -f ", "times": -1, "action": "fail"})
    reply = push(edd, deployment, images.unhealthy)
    fired(faulty_docker, "fail")
    assert reply.status == 502, reply
    assert reply.json["restored"] is False, reply.json
    shown = reply.json["deployment"]
    assert shown["image_id"] == bad_id and shown["state"] == "running", shown
    assert fetch(deployment.port) == "unhealthy\n"       # what the answer shows
    assert re.search(r"ERROR .*%s.*docker rm -f" % re.escape(deployment.name), edd.log())
    assert re.search(r"audit .*deployment=%s .*restored=False" % re.escape(deployment.name),
                     edd.log())
    assert metric_value(edd, "edd_deploys_total", action="load", deployment=deployment.name,
                        outcome="restore_failed") == 1
    assert metric_value(edd, "edd_restores_total", deployment=deployment.name) == 0

    # Docker heals; the next start of edd finishes the undo from its record.
    faulty_docker.set()
    edd.stop()
    edd.relaunch()
    wait_for(lambda: container_state(deployment.name + ".edd-old") is None, timeout=30,
             message="the undo to be finished at start-up")
    assert fetch(deployment.port) == V1_TEXT
    assert current(deployment) == v1_id


@pytest.mark.parametrize("action", ["fail", "hang"])
def test_logs_failing_or_hanging_does_not_abandon_the_undo(edd_factory, images,
                                                           faulty_docker, action):
    # Stands for `docker logs` failing (a log driver that cannot read back) or
    # hanging (a daemon under load) while edd collects the failed container's log.
    edd, deployment = started(edd_factory, images, faulty_docker)
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    faulty_docker.set({"match": r"^logs ", "action": action})
    reply = push(edd, deployment, images.exits)
    fired(faulty_docker, action)
    assert_restored(reply, deployment, old_id, v1_id)
    assert reply.elapsed < 45, reply.elapsed


def test_inspect_failing_in_the_failure_path(edd_factory, images, faulty_docker):
    # Stands for the daemon failing two inspects in a row after the new container
    # failed (a busy daemon answering 500): the undo still runs and verifies.
    edd, deployment = started(edd_factory, images, faulty_docker)
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    faulty_docker.set({"match": r"inspect", "armed_by": r"^logs ", "times": 2,
                       "action": "fail"})
    reply = push(edd, deployment, images.exits)
    fired(faulty_docker, "fail")
    assert_restored(reply, deployment, old_id, v1_id)


# ---------------------------------------------------------------------------
# A docker CLI that reports failure while the daemon goes on
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["detach", "detach-hang"])
def test_stop_cli_failing_while_the_daemon_stops(edd_factory, make_image, images,
                                                 faulty_docker, action):
    # The old container's process ignores SIGTERM, so the daemon's stop takes
    # stop_timeout_seconds (4 s). "detach" stands for a `docker stop` CLI that
    # loses its connection to the daemon: it exits 1 at once while the daemon goes
    # on stopping. "detach-hang" for one that hangs while the daemon stops: edd's
    # timeout (stop_timeout_seconds plus a margin, not a fixed 300 s) kills it.
    # Either way an inspect, not the CLI, decides what happened.
    slow_v1 = make_image(run_tag("edd-test-faults-slow"), content=V1_TEXT, cmd=HTTPD_CMD)
    edd, deployment = started(edd_factory, images, faulty_docker, archive=slow_v1,
                              stop_timeout_seconds=4)
    faulty_docker.set({"match": r"^stop ", "action": action})
    reply = push(edd, deployment, images.v2)
    fired(faulty_docker, action)
    body = assert_ok(reply)
    assert body["image_id"] == images.id(images.v2)
    assert reply.elapsed < 60, reply.elapsed
    time.sleep(6)       # past the daemon's stop timeout: the answer still holds
    assert fetch(deployment.port) == V2_TEXT
    assert current(deployment) == images.id(images.v2)


@pytest.mark.parametrize("step", ["tag", "park", "create", "start"])
def test_step_done_but_reported_failed_is_checked(edd_factory, images, faulty_docker, step):
    # Stands for a CLI that reports failure after the daemon did the work (the
    # reply lost on the way back). edd looks before it acts: the tag points at the
    # new image, the old container is parked, the new one exists (found by its
    # swap label, as its ID was never printed) or runs, so the swap goes on.
    edd, deployment = started(edd_factory, images, faulty_docker)
    pattern = {"tag": r"^tag \S+ edd/%s:current$", "park": r"^rename \S+ %s\.edd-old$",
               "create": r"^create .* --name %s ", "start": r"^start "}[step]
    if "%s" in pattern:
        pattern %= re.escape(deployment.name)
    faulty_docker.set({"match": pattern, "action": "after"})
    reply = push(edd, deployment, images.v2)
    fired(faulty_docker, "after")
    assert_ok(reply)
    assert fetch(deployment.port) == V2_TEXT
    assert current(deployment) == images.id(images.v2)
    assert current(deployment, "previous") == images.id(images.v1)
    assert container_state(deployment.name + ".edd-old") is None


def test_previous_survives_a_failed_tag(edd_factory, images, faulty_docker):
    # Stands for a transient failure of the `docker tag` that makes the replaced
    # image `previous`: the tag that was there is never removed first.
    edd, deployment = started(edd_factory, images, faulty_docker)
    assert_ok(push(edd, deployment, images.v2))
    faulty_docker.set({"match": r"^tag \S+ edd/%s:previous$" % re.escape(deployment.name),
                       "action": "fail"})
    assert_ok(push(edd, deployment, images.v3))
    fired(faulty_docker, "fail")
    assert fetch(deployment.port) == V3_TEXT
    assert current(deployment) == images.id(images.v3)
    assert current(deployment, "previous") == images.id(images.v2)


# ---------------------------------------------------------------------------
# A committed swap stays committed
# ---------------------------------------------------------------------------

def _swap_leaving_parked(edd_factory, images, faulty_docker):
    """v1 then v2, with every removal of the parked container failing; return (edd,
    deployment). Stands for a daemon that cannot remove a container for a while."""
    edd, deployment = started(edd_factory, images, faulty_docker)
    faulty_docker.set({"match": r"^rm ", "times": -1, "action": "fail"})
    assert_ok(push(edd, deployment, images.v2))
    fired(faulty_docker, "fail")
    assert fetch(deployment.port) == V2_TEXT
    assert container_state(deployment.name + ".edd-old") is not None
    faulty_docker.set()
    return edd, deployment


def test_committed_swap_is_finished_not_undone_at_restart(edd_factory, images,
                                                          faulty_docker):
    edd, deployment = _swap_leaving_parked(edd_factory, images, faulty_docker)
    edd.stop()
    edd.relaunch()
    wait_for(lambda: container_state(deployment.name + ".edd-old") is None, timeout=30,
             message="the committed swap to be finished")
    assert fetch(deployment.port) == V2_TEXT
    assert current(deployment) == images.id(images.v2)
    assert current(deployment, "previous") == images.id(images.v1)


def test_deleted_deployment_stays_deleted_after_restart(edd_factory, images, faulty_docker):
    edd, deployment = _swap_leaving_parked(edd_factory, images, faulty_docker)
    assert_ok(curl(edd, "DELETE", "/v1/deployments/%s" % deployment.name))
    assert unreachable(deployment.port)
    edd.stop()
    edd.relaunch()
    time.sleep(1)
    assert container_state(deployment.name) is None
    assert container_state(deployment.name + ".edd-old") is None
    assert unreachable(deployment.port)


# ---------------------------------------------------------------------------
# Two edd processes on one engine
# ---------------------------------------------------------------------------

def test_second_edd_does_not_undo_a_swap_in_flight(edd_factory, images):
    first, deployment = started(edd_factory, images, settle_seconds=6)
    pusher, replies = push_until_parked(first, deployment, images.v2)
    second = edd_factory.start([deployment])     # same state_dir: the factory's
    assert re.search(r"deployment %s: .*another edd" % re.escape(deployment.name),
                     second.log()), second.log()
    reply = push(second, deployment, images.v3)
    assert reply.status == 409, reply
    pusher.join(60)
    assert replies and replies[0].status == 200, replies
    assert fetch(deployment.port) == V2_TEXT
    assert container_state(deployment.name + ".edd-old") is None


# ---------------------------------------------------------------------------
# The gate, the engine as it is
# ---------------------------------------------------------------------------

def test_gate_fails_a_crash_loop_under_a_restart_policy(edd_factory, make_image, images):
    looping = make_image(run_tag("edd-test-faults-loop"), content="loop\n", cmd=[
        "/bin/busybox", "sh", "-c", "/bin/busybox httpd -p 8000 -h /www; sleep 1; exit 1"])
    edd, deployment = started(edd_factory, images, settle_seconds=4,
                              args=["--restart", "unless-stopped"])
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    reply = push(edd, deployment, looping)
    assert "restart" in reply.json["error"], reply.json
    assert_restored(reply, deployment, old_id, v1_id)


def test_slow_stopping_old_container(edd_factory, make_image, images):
    # busybox httpd as PID 1 ignores SIGTERM: every stop takes stop_timeout_seconds.
    slow_v1 = make_image(run_tag("edd-test-faults-slow"), content=V1_TEXT, cmd=HTTPD_CMD)
    edd, deployment = started(edd_factory, images, archive=slow_v1, stop_timeout_seconds=3)
    old_id, v1_id = container_id(deployment.name), images.id(slow_v1)
    reply = push(edd, deployment, images.exits)
    assert_restored(reply, deployment, old_id, v1_id)
    assert_ok(push(edd, deployment, images.v2))
    assert fetch(deployment.port) == V2_TEXT


# ---------------------------------------------------------------------------
# Exact state, names docker could misread, rollback, crashes, SIGTERM
# ---------------------------------------------------------------------------

def test_paused_container_is_restored_paused(edd_factory, images):
    edd, deployment = started(edd_factory, images)
    old_id, v1_id = container_id(deployment.name), images.id(images.v1)
    docker_cli("pause", deployment.name)
    reply = push(edd, deployment, images.exits)
    assert_restored(reply, deployment, old_id, v1_id, state="paused")
    docker_cli("unpause", deployment.name)
    assert fetch(deployment.port) == V1_TEXT


def test_hex_deployment_name_is_not_read_as_a_container_id(edd_factory, images):
    # docker resolves a name that matches no container as an ID prefix.
    docker_cli("load", "-i", images.v1)
    other = docker_cli("create", "--label", "edd.test=hex-name", V1)
    other_id = other.stdout.strip()
    try:
        deployment = edd_factory.deployment(name=other_id[:12])
        edd = edd_factory.start([deployment])
        reply = curl(edd, "GET", "/v1/deployments/%s" % deployment.name)
        assert reply.json["state"] == "absent", reply.json
        assert_ok(push(edd, deployment, images.v1))
        assert fetch(deployment.port) == V1_TEXT
        assert container_id(deployment.name) != other_id
        assert container_state(other_id) == "created"
    finally:
        docker_cli("rm", "-f", other_id, check=False)


def test_rollback_to_the_running_image_is_409(edd_factory, images):
    edd, deployment = started(edd_factory, images)
    old_id = container_id(deployment.name)
    docker_cli("tag", "edd/%s:current" % deployment.name, "edd/%s:previous" % deployment.name)
    reply = curl(edd, "POST", "/v1/deployments/%s/rollback" % deployment.name)
    assert reply.status == 409, reply
    assert "already running" in reply.json["error"], reply.json
    assert container_id(deployment.name) == old_id
    assert fetch(deployment.port) == V1_TEXT


def test_foreign_container_taking_the_name_is_never_removed(edd_factory, images,
                                                            faulty_docker):
    # Stands for someone running `docker create --name NAME …` by hand at the
    # moment the old container is parked, before edd creates the new one.
    edd, deployment = started(edd_factory, images, faulty_docker)
    faulty_docker.set({"match": r"^create ", "action": "pass", "before": [
        "create", "--name", deployment.name, "edd/%s:current" % deployment.name]})
    reply = push(edd, deployment, images.v2)
    fired(faulty_docker, "pass")
    foreign = container_id(deployment.name)
    assert foreign is not None
    assert docker_cli("inspect", "--format", '{{index .Config.Labels "edd.deployment"}}',
                      foreign).stdout.strip() == ""
    assert reply.status == 502, reply
    assert reply.json["restored"] is False, reply.json
    assert deployment.name in reply.json["error"], reply.json
    # The old container was never stopped and runs, parked, as it did.
    assert fetch(deployment.port) == V1_TEXT


def test_interrupted_swap_restores_a_stopped_container_stopped(edd_factory, images):
    deployment = edd_factory.deployment()
    first = edd_factory.start([deployment])
    assert_ok(push(first, deployment, images.v1))
    assert_ok(curl(first, "POST", "/v1/deployments/%s/stop" % deployment.name))
    old_id = container_id(deployment.name)
    first.stop()
    kill_mid_gate(edd_factory, deployment, images.v2, deployment.name)
    first.relaunch()
    wait_for(lambda: container_state(deployment.name + ".edd-old") is None, timeout=30,
             message="the interrupted swap to be undone")
    assert container_id(deployment.name) == old_id
    assert container_state(deployment.name) == "exited"
    assert unreachable(deployment.port)
    assert current(deployment) == images.id(images.v1)


def test_interrupted_first_deploy_leaves_nothing_running(edd_factory, images):
    deployment = edd_factory.deployment()
    kill_mid_gate(edd_factory, deployment, images.v1, deployment.name)
    edd_factory.start([deployment])
    assert container_state(deployment.name) is None
    assert current(deployment) is None
    assert unreachable(deployment.port)


def test_recovery_waits_for_docker_to_come_back(edd_factory, images, faulty_docker):
    deployment = edd_factory.deployment()
    first = edd_factory.start([deployment], docker=str(faulty_docker.path))
    assert_ok(push(first, deployment, images.v1))
    old_id = container_id(deployment.name)
    first.stop()
    kill_mid_gate(edd_factory, deployment, images.v2, deployment.name + ".edd-old",
                  state=None)
    # Stands for dockerd still starting (or restarting) when edd starts.
    faulty_docker.set({"match": r".", "times": -1, "action": "fail"})
    first.relaunch()
    fired(faulty_docker, "fail")
    time.sleep(2)
    assert container_state(deployment.name + ".edd-old") is not None
    faulty_docker.set()
    wait_for(lambda: container_state(deployment.name + ".edd-old") is None, timeout=60,
             message="the swap to be undone once docker answers")
    assert container_id(deployment.name) == old_id
    assert fetch(deployment.port) == V1_TEXT
    assert current(deployment) == images.id(images.v1)


def test_sigterm_waits_for_a_gate_longer_than_75_seconds(edd_factory, images):
    first, deployment = started(edd_factory, images)
    first.stop()
    edd = edd_factory.start([dict(deployment, settle_seconds=80)])
    pusher, replies = push_until_parked(edd, deployment, images.v2)
    edd.proc.send_signal(signal.SIGTERM)
    assert edd.proc.wait(120) == 0, edd.log()
    pusher.join(30)
    assert replies and replies[0].status == 200, replies
    assert fetch(deployment.port) == V2_TEXT
    assert container_state(deployment.name + ".edd-old") is None


# ---------------------------------------------------------------------------
# The record and the lock, without docker
# ---------------------------------------------------------------------------

def test_lock_is_exclusive_across_processes(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import edd; "
         "edd.lock_deployment(%r, 'web'); print('held', flush=True); sys.stdin.read()"
         % (str(EDD.parent), str(tmp_path))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(edd_module.Conflict, match="another edd process"):
            edd_module.lock_deployment(str(tmp_path), "web")
        os.close(edd_module.lock_deployment(str(tmp_path), "other"))
    finally:
        holder.stdin.close()
        holder.wait(10)
    os.close(edd_module.lock_deployment(str(tmp_path), "web"))


def test_record_round_trip_and_a_damaged_record(tmp_path):
    state = str(tmp_path)
    assert edd_module.read_record(state, "web") is None
    record = {"deployment": "web", "phase": "swapping", "old": None}
    edd_module.write_record(state, "web", record)
    assert edd_module.read_record(state, "web") == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.swap"]
    edd_module.remove_record(state, "web")
    assert edd_module.read_record(state, "web") is None
    (tmp_path / "web.swap").write_text("{half a rec")
    with pytest.raises(edd_module.EddError, match="web.swap"):
        edd_module.read_record(state, "web")
