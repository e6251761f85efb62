"""edd as an ordinary user, driving that user's rootless podman (issue 14): no root
anywhere in edd's path. The test itself runs as root only to set the stage (a
work directory the user owns) and to start edd with the user's uid via setpriv.

The user comes from EDD_TEST_ROOTLESS_USER (default edd-rootless); .ci/run creates
it with subuid/subgid ranges, as the README's rootless setup says. Without it the
test is skipped, or fails when EDD_REQUIRE_DOCKER=1.
"""

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import (EDD, ENGINE, EXITS_CMD, HEALTHY_CHECK, EddFactory, curl, docker_cli,
                      fetch, https_request, run_tag)

ROOTLESS_USER = os.environ.get("EDD_TEST_ROOTLESS_USER", "edd-rootless")
V1, V2 = run_tag("edd-rootless-site", "v1"), run_tag("edd-rootless-site", "v2")


def _unavailable(problem):
    if os.environ.get("EDD_REQUIRE_DOCKER") == "1":
        pytest.fail("EDD_REQUIRE_DOCKER=1 but rootless podman is not set up: %s" % problem,
                    pytrace=False)
    pytest.skip("rootless podman is not set up: %s" % problem)


@pytest.fixture
def rootless(pki, tmp_path):
    """(an EddFactory whose edd runs as ROOTLESS_USER, that user's pwd entry). Its
    .files are the TLS files in a directory the user owns, for the config."""
    if os.geteuid() != 0:
        _unavailable("the test must run as root to start edd as %s" % ROOTLESS_USER)
    try:
        user = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        _unavailable("no user %s (useradd -m %s)" % (ROOTLESS_USER, ROOTLESS_USER))
    if not shutil.which("podman"):
        _unavailable("no podman on PATH")
    runtime_dir = Path("/run/user/%d" % user.pw_uid)
    if not runtime_dir.is_dir():
        runtime_dir.mkdir(mode=0o700, parents=True)
        os.chown(str(runtime_dir), user.pw_uid, user.pw_gid)
    as_user = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
               "--init-groups", "--", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin",
               "HOME=" + user.pw_dir, "XDG_RUNTIME_DIR=%s" % runtime_dir,
               "LANG=C.UTF-8"]
    # A directory the user owns: its config, its TLS key, a copy of edd.py.
    work = Path(tempfile.mkdtemp(prefix="edd-rootless-"))
    files = {"edd": work / "edd.py", "server_cert": work / "server.crt",
             "server_key": work / "server.key", "client_ca": work / "ca.crt"}
    for source, key in ((EDD, "edd"), (pki.server_cert, "server_cert"),
                        (pki.server_key, "server_key"), (pki.ca, "client_ca")):
        shutil.copy(str(source), str(files[key]))
    for path in [work] + list(files.values()):
        os.chown(str(path), user.pw_uid, user.pw_gid)
    # The test's own look at the user's podman (docker_cli, clean-up) goes
    # through this wrapper: the same podman, the same user. Root runs it, so it
    # lives where only root can write.
    wrapper = tmp_path / "podman-as-user"
    wrapper.write_text("#!/bin/sh\nexec %s podman \"$@\"\n" % " ".join(as_user))
    wrapper.chmod(0o755)
    previous, ENGINE["cli"] = ENGINE["cli"], str(wrapper)
    factory = EddFactory(work, pki)
    factory.command = as_user + ["/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                                 else sys.executable, str(files["edd"])]
    factory.files = {key: str(path) for key, path in files.items() if key != "edd"}
    try:
        yield factory, user
    finally:
        factory.cleanup()
        # Pushes tagged the archives' own names (edd-rootless-…) in the user's store.
        pushed = [ref for ref in docker_cli("images", "--format", "{{.Repository}}:{{.Tag}}",
                                            check=False).stdout.split()
                  if ref.split("/")[-1].startswith("edd-rootless-")]
        if pushed:
            docker_cli("rmi", *pushed, check=False)
        ENGINE["cli"] = previous
        shutil.rmtree(str(work), ignore_errors=True)


def test_rootless_podman_edd_deploys_gates_restores_and_rolls_back(rootless, image_factory):
    factory, user = rootless
    deployment = factory.deployment(health_timeout_seconds=30)
    edd = factory.start([deployment], **dict(factory.files, docker="podman"))
    with open("/proc/%d/status" % edd.proc.pid) as status:
        uids = [line.split()[1:] for line in status if line.startswith("Uid:")][0]
    assert set(uids) == {str(user.pw_uid)}, uids            # edd holds no root uid

    health = https_request(edd, "GET", "/v1/health").json
    assert health["engine"]["name"] == "podman", health
    assert health["engine"]["rootless"] is True, health

    def push(archive):
        return curl(edd, "POST", "/v1/deployments/%s/load" % deployment.name, upload=archive)

    # The gate waits for the HEALTHCHECK; podman has no systemd here to run it.
    reply = push(image_factory(V1, content="rootless v1\n", healthcheck=HEALTHY_CHECK))
    assert reply.status == 200, reply.body
    assert reply.json["health"] == "healthy", reply.json
    assert fetch(deployment.port) == "rootless v1\n"

    # An image that exits: restored, the old container serves as before.
    reply = push(image_factory(run_tag("edd-rootless-bad"), cmd=EXITS_CMD))
    assert reply.status == 502 and reply.json["restored"] is True, reply.body
    assert fetch(deployment.port) == "rootless v1\n"

    reply = push(image_factory(V2, content="rootless v2\n"))
    assert reply.status == 200, reply.body
    assert fetch(deployment.port) == "rootless v2\n"

    reply = curl(edd, "POST", "/v1/deployments/%s/rollback" % deployment.name)
    assert reply.status == 200, reply.body
    assert fetch(deployment.port) == "rootless v1\n"

    # The container is the user's: root's podman and docker know nothing of it.
    for cli in ("podman", "docker"):
        found = subprocess.run([cli, "container", "inspect", deployment.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert found.returncode != 0, cli


# ---------------------------------------------------------------------------
# The README's drop-in for edd.service, as systemd-analyze sees it
# ---------------------------------------------------------------------------

def readme_drop_in():
    """The ```ini block of the README's "Rootless Podman" section."""
    text = (EDD.parent / "README.md").read_text()
    section = text[text.index("### Rootless Podman"):]
    return section.split("```ini\n", 1)[1].split("```", 1)[0], section


def test_readme_drop_in_verifies_and_scores_as_the_readme_says(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") or os.environ.get("EDD_REQUIRE_DOCKER") == "1":
            pytest.fail("systemd-analyze is missing (Debian package: systemd)")
        pytest.skip("systemd-analyze is not installed")
    drop_in, section = readme_drop_in()
    assert "User=edd" in drop_in.splitlines()
    destdir = tmp_path / "root"
    done = subprocess.run(["make", "--no-print-directory", "-C", str(EDD.parent), "install",
                           "DESTDIR=%s" % destdir, "PREFIX=/usr/local"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    assert done.returncode == 0, done.stdout
    unit = (destdir / "lib/systemd/system/edd.service").read_text().replace(
        "ExecStart=/usr/local/bin/edd ", "ExecStart=%s/usr/local/bin/edd " % destdir)
    # Settings later in one file override earlier ones, as a drop-in's do.
    checked = tmp_path / "checked" / "edd.service"
    checked.parent.mkdir()
    checked.write_text(unit + "\n" + drop_in)
    analyze = ["systemd-analyze", "--no-pager"]
    verify = subprocess.run(analyze + ["verify", str(checked)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
    assert verify.returncode == 0 and verify.stdout.strip() == "", verify.stdout
    security = subprocess.run(analyze + ["security", "--offline=true", str(checked)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
    measured = re.search(r"Overall exposure level for edd\.service: (\d+\.\d+)",
                         security.stdout)
    stated = re.search(r"scores the unit with this drop-in\s+(\d+\.\d+)", section)
    assert measured and stated, security.stdout
    assert measured.group(1) == stated.group(1), security.stdout
