"""Issue 15: a deployment's release_command runs in a one-off container from the new
image before anything changes, and a failed release never stops the running version.

The end-to-end tests use the real engine; each ends by fetching what the deployment
serves. The release commands below read the image's own index.html, so one config
entry can succeed for one image and fail (or hang) for another, as a migration would.
"""

import json
import os
import re
import secrets
import threading
import time

import pytest

import edd
from conftest import (assert_ok, push, Prober, children, container_state, curl, docker_cli, fetch, image_id,
                      run_tag, wait_for)

SH = ["/bin/busybox", "sh", "-c"]
# The image's page decides what its release command does: FAIL exits 3, HANG sleeps.
RELEASE = SH + ["echo release of $(cat /www/index.html); "
                "if grep -q FAIL /www/index.html; then "
                "echo 'migration 0042 failed: column exists' >&2; exit 3; fi; "
                "if grep -q HANG /www/index.html; then echo hanging; sleep 600; fi; "
                "echo release done"]
HTTPD = "trap 'exit 0' TERM; /bin/busybox httpd -f -p 8000 -h /www & wait"


def release_image(make_image, version, content=None, cmd=None):
    return make_image(run_tag("edd-test-release", version), content=content or version + "\n",
                      cmd=cmd)


def release_containers(name):
    """IDs of every container, running or not, labelled as the release of `name`."""
    return docker_cli("ps", "-aq", "--filter", "label=edd.release=%s" % name).stdout.split()


def container_field(name, template):
    return docker_cli("inspect", "--type", "container", "--format", template, name).stdout


@pytest.fixture
def release_cleanup(edd_factory):
    """Remove what a failed test may leave: release containers of this test's deployments."""
    yield
    for name in edd_factory.names:
        leftovers = release_containers(name)
        if leftovers:
            docker_cli("rm", "-f", *leftovers, check=False)


# ---------------------------------------------------------------------------
# The pure parts: config keys, which args the one-off gets, outcome, exit code
# ---------------------------------------------------------------------------

def tls_config(tmp_path, deployment):
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server_cert": "server.crt", "server_key": "server.key",
                                "client_ca": "ca.crt", "deployments": [deployment]}))
    return str(path)


def test_release_keys_default_and_parse(tmp_path):
    config = edd.load_config(tls_config(tmp_path, {"name": "web"}))
    web = config.deployments["web"]
    assert (web.release_command, web.release_timeout_seconds) == ((), 300.0)
    assert web.release_container == "web.edd-release"
    config = edd.load_config(tls_config(tmp_path, {
        "name": "web", "release_command": ["./manage.py", "migrate"],
        "release_timeout_seconds": 30}))
    web = config.deployments["web"]
    assert (web.release_command, web.release_timeout_seconds) == \
        (("./manage.py", "migrate"), 30.0)


@pytest.mark.parametrize("change, message", [
    ({"release_command": "./manage.py migrate"}, "release_command: must be a list"),
    ({"release_command": ["migrate", 1]}, "release_command: must be a list of strings"),
    ({"release_timeout_seconds": 0}, "release_timeout_seconds: must be greater than 0"),
    ({"release_timeout_seconds": "60"}, "release_timeout_seconds: must be a number"),
    ({"release_timeout_seconds": True}, "release_timeout_seconds: must be a number"),
])
def test_release_key_mistakes_are_one_line(tmp_path, change, message):
    path = tls_config(tmp_path, dict({"name": "web"}, **change))
    with pytest.raises(edd.ConfigError) as caught:
        edd.load_config(path)
    assert str(caught.value) == "%s: deployments[0].%s" % (path, message)


@pytest.mark.parametrize("args, kept", [
    (["-p", "80:8000", "-v", "/srv/data:/data"], ["-v", "/srv/data:/data"]),
    (["-p=80:8000", "--publish=81:8000", "--publish", "82:8000", "-p8443:443"], []),
    (["-P", "--publish-all", "--publish-all=true", "--init"], ["--init"]),
    (["--restart", "always", "--restart=on-failure:3", "-u", "1000"], ["-u", "1000"]),
    (["-it", "-ti", "-t", "-i", "--tty", "--interactive=true"], []),
    (["-itp", "80:8000", "-e", "A=1"], ["-e", "A=1"]),
    (["-itp=80:8000", "--env-file", "/etc/edd/web.env"], ["--env-file", "/etc/edd/web.env"]),
    (["-itw", "/app"], ["-w", "/app"]),
    (["--network", "backend", "--ip", "10.0.0.5", "--network-alias", "web"],
     ["--network", "backend"]),
    (["--cidfile", "/run/web.cid", "-e", "JAVA_OPTS", "-e", "-Xmx1g"],
     ["-e", "JAVA_OPTS", "-e", "-Xmx1g"]),
    (["-eFOO=1", "-v/a:/b"], ["-eFOO=1", "-v/a:/b"]),
])
def test_release_args_keep_all_but_ports_restart_and_tty(args, kept):
    assert edd.release_args(args) == kept


def test_outcome_of_a_failed_release():
    failed = {"release": {"exit_code": 3, "output": ""}, "restored": True}
    assert edd.deploy_outcome(502, failed) == "release_failed"
    assert edd.deploy_outcome(502, {"release": {"exit_code": None}}) == "release_failed"
    assert edd.deploy_outcome(200, {"release": {"exit_code": 0}}) == "deployed"
    assert edd.deploy_outcome(502, {"restored": True}) == "restored"
    assert edd.deploy_outcome(409, {}) == "refused"


# ---------------------------------------------------------------------------
# Against the real engine
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_release_runs_before_the_swap_and_on_rollback(edd_factory, make_image, tmp_path,
                                                      release_cleanup):
    volume = tmp_path / "release"
    volume.mkdir()
    # The app refuses to start unless the marker holds its own page: it only
    # serves if its image's release command ran before it was started.
    cmd = SH + ['[ "$(cat /www/index.html)" = "$(cat /www/release/marker)" ] || '
                '{ echo "no release marker"; exit 1; }; ' + HTTPD]
    v1 = release_image(make_image, "marker-v1", cmd=cmd)
    v2 = release_image(make_image, "marker-v2", cmd=cmd)
    command = SH + ["echo migrating $(cat /www/index.html); "
                    "cat /www/index.html > /www/release/marker; "
                    "cat /www/index.html >> /www/release/history; echo migrated"]
    # -p (published by the running container), --restart and -it must not reach the
    # one-off container: with any of them the second release could not run.
    deployment = edd_factory.deployment(
        release_command=command,
        args=["-v", "%s:/www/release" % volume, "--restart=unless-stopped", "-it"])
    edd_ = edd_factory.start([deployment])

    body = assert_ok(push(edd_, deployment, v1))
    assert body["release"] == {"exit_code": 0, "output": "migrating marker-v1\nmigrated\n"}
    assert fetch(deployment.port, "/release/marker") == "marker-v1\n"

    body = assert_ok(push(edd_, deployment, v2))
    assert body["release"]["exit_code"] == 0
    assert "migrating marker-v2" in body["release"]["output"]
    assert body["image_id"] == make_image.image_id(v2)
    assert fetch(deployment.port) == "marker-v2\n"
    assert fetch(deployment.port, "/release/marker") == "marker-v2\n"

    # Rollback runs the release command of the image it goes back to.
    body = assert_ok(curl(edd_, "POST", "/v1/deployments/%s/rollback" % deployment.name))
    assert "migrating marker-v1" in body["release"]["output"]
    assert fetch(deployment.port) == "marker-v1\n"
    assert (volume / "history").read_text() == "marker-v1\nmarker-v2\nmarker-v1\n"
    assert release_containers(deployment.name) == []
    assert container_state(deployment.name + ".edd-release") is None


@pytest.mark.docker
def test_failed_release_never_stops_the_running_version(edd_factory, make_image,
                                                        release_cleanup):
    v1 = release_image(make_image, "probe-v1")
    bad = release_image(make_image, "probe-bad", content="probe-bad FAIL\n")
    deployment = edd_factory.deployment(release_command=RELEASE)
    edd_ = edd_factory.start([deployment])
    body = assert_ok(push(edd_, deployment, v1))
    assert body["release"]["output"].endswith("release done\n"), body
    assert fetch(deployment.port) == "probe-v1\n"
    v1_id = make_image.image_id(v1)
    running = container_field(deployment.name, "{{.Id}} {{.State.StartedAt}}")

    prober = Prober(deployment.port, "probe-v1\n")
    prober.start()
    wait_for(lambda: prober.answered >= 5, message="the prober's first answers")
    reply = push(edd_, deployment, bad)
    time.sleep(0.5)
    prober.stop()

    assert reply.status == 502, reply
    assert prober.failures == [], prober.failures[:5]
    assert prober.answered >= 10, prober.answered
    assert reply.json["restored"] is True, reply.json
    assert reply.json["release"]["exit_code"] == 3, reply.json
    assert "migration 0042 failed: column exists" in reply.json["release"]["output"]
    assert "exit code 3" in reply.json["error"], reply.json
    assert "never stopped" in reply.json["error"], reply.json
    assert reply.json["deployment"]["image_id"] == v1_id, reply.json

    # Not restarted, not renamed, no tag moved, nothing left behind.
    assert container_field(deployment.name, "{{.Id}} {{.State.StartedAt}}") == running
    assert image_id("edd/%s:current" % deployment.name) == v1_id
    assert image_id("edd/%s:previous" % deployment.name) is None
    assert container_state(deployment.name + ".edd-old") is None
    assert release_containers(deployment.name) == []
    assert fetch(deployment.port) == "probe-v1\n"

    metrics = curl(edd_, "GET", "/metrics").body
    assert ('edd_deploys_total{action="load",deployment="%s",outcome="release_failed"} 1'
            % deployment.name) in metrics, metrics
    assert 'edd_restores_total{deployment="%s"}' % deployment.name not in metrics
    audit = wait_for(lambda: re.search(r"audit .*deployment=%s .*status=502.*" % deployment.name,
                                       edd_.log()), message="the audit line")
    assert "outcome=release_failed" in audit.group(0), audit.group(0)


@pytest.mark.docker
def test_hanging_release_is_cut_off_at_the_timeout(edd_factory, make_image, release_cleanup):
    v1 = release_image(make_image, "hang-v1")
    hangs = release_image(make_image, "hang-v2", content="hang-v2 HANG\n")
    deployment = edd_factory.deployment(release_command=RELEASE, release_timeout_seconds=2)
    edd_ = edd_factory.start([deployment])
    assert_ok(push(edd_, deployment, v1))
    v1_id = make_image.image_id(v1)

    reply = push(edd_, deployment, hangs)
    assert reply.status == 502, reply
    assert reply.elapsed < 20, reply.elapsed
    assert reply.json["restored"] is True, reply.json
    assert reply.json["release"]["exit_code"] is None, reply.json
    assert "hanging" in reply.json["release"]["output"], reply.json
    assert "did not finish within 2 s" in reply.json["error"], reply.json
    # Killing the CLI does not stop the container: edd removed it.
    assert release_containers(deployment.name) == []
    assert not [argv for argv in children(edd_.proc.pid) if " run " in argv]
    assert image_id("edd/%s:current" % deployment.name) == v1_id
    assert fetch(deployment.port) == "hang-v1\n"


@pytest.mark.docker
def test_edd_killed_during_release_leaves_no_one_off_after_restart(
        edd_factory, make_image, release_cleanup):
    v1 = release_image(make_image, "crash-v1")
    hangs = release_image(make_image, "crash-v2", content="crash-v2 HANG\n")
    v3 = release_image(make_image, "crash-v3")
    deployment = edd_factory.deployment(release_command=RELEASE)
    edd_ = edd_factory.start([deployment])
    assert_ok(push(edd_, deployment, v1))

    pusher = threading.Thread(target=push, args=(edd_, deployment, hangs), daemon=True)
    pusher.start()
    release = deployment.name + ".edd-release"
    wait_for(lambda: container_state(release) == "running", timeout=30,
             message="the release container to run")
    edd_.kill()
    pusher.join(30)
    assert container_state(release) == "running"      # what the crash left
    assert fetch(deployment.port) == "crash-v1\n"

    edd_.relaunch()
    wait_for(lambda: not release_containers(deployment.name), timeout=20,
             message="edd to remove the release container at startup")
    assert "left by an interrupted release" in edd_.log()
    assert fetch(deployment.port) == "crash-v1\n"
    # The name is free again: the next release runs.
    assert "release done" in assert_ok(push(edd_, deployment, v3))["release"]["output"]
    assert fetch(deployment.port) == "crash-v3\n"


@pytest.mark.docker
def test_release_and_app_see_the_env_file(edd_factory, make_image, tmp_path, release_cleanup):
    secret = "s3cret-" + secrets.token_hex(8)
    env_file = tmp_path / "website.env"
    env_file.write_text("EDD_TEST_SECRET=%s\n" % secret)
    os.chmod(str(env_file), 0o600)
    app = release_image(make_image, "env-v1", cmd=SH + [
        'echo "$EDD_TEST_SECRET" > /www/env.txt; ' + HTTPD])
    deployment = edd_factory.deployment(
        args=["--env-file", str(env_file)],
        release_command=SH + ['echo "release sees $EDD_TEST_SECRET"'])
    edd_ = edd_factory.start([deployment])

    body = assert_ok(push(edd_, deployment, app))
    assert body["release"]["output"] == "release sees %s\n" % secret
    assert fetch(deployment.port, "/env.txt") == secret + "\n"
    assert fetch(deployment.port) == "env-v1\n"
    assert os.stat(str(env_file)).st_mode & 0o777 == 0o600


@pytest.mark.docker
def test_hand_made_release_container_is_never_touched(edd_factory, make_image,
                                                      release_cleanup):
    v1 = release_image(make_image, "hand-v1")
    v2 = release_image(make_image, "hand-v2")
    deployment = edd_factory.deployment(release_command=RELEASE)
    edd_ = edd_factory.start([deployment])
    assert_ok(push(edd_, deployment, v1))
    release = deployment.name + ".edd-release"
    docker_cli("create", "--name", release, "edd/%s:current" % deployment.name)
    try:
        reply = push(edd_, deployment, v2)
        assert reply.status == 409, reply
        assert release in reply.json["error"], reply.json
        assert container_state(release) == "created"
        assert fetch(deployment.port) == "hand-v1\n"
    finally:
        docker_cli("rm", "-f", release, check=False)
