"""The engines edd drives (issue 14): what it learns about each, and the differences
it hides from the deploy logic. Unit tests feed the Docker section what docker and
podman really print (captured from docker 20.10, podman 4.3.1 and moby's source);
the engine tests run on every engine, like the rest of the suite.
"""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import (EDD, curl, docker_cli, fetch, https_request, image_id, is_podman,
                      rewrite_archive,
                      run_tag, wait_for)

sys.path.insert(0, str(EDD.parent))
import edd  # noqa: E402

V1, V1_TEXT = run_tag("edd-engines-site"), "engines v1\n"


# ---------------------------------------------------------------------------
# Engine records: kind, version, image store, thin archives
# ---------------------------------------------------------------------------

DOCKER_INFO = {"ServerVersion": "20.10.24+dfsg1", "Driver": "overlay2",
               "DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]],
               "SecurityOptions": ["name=apparmor", "name=seccomp,profile=default"]}
# Docker 29 on the containerd image store (its default on fresh installs).
CONTAINERD_INFO = {"ServerVersion": "29.1.3", "Driver": "overlayfs",
                   "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
                   "SecurityOptions": ["name=seccomp,profile=builtin", "name=rootless",
                                       "name=cgroupns"]}
PODMAN_INFO = {"host": {"security": {"rootless": True}}, "store": {"graphDriverName": "vfs"},
               "version": {"Version": "4.3.1", "APIVersion": "4.3.1"}}


def test_engine_records():
    classic = edd.engine_from_info("docker", DOCKER_INFO)
    assert (classic.kind, classic.version, classic.image_store, classic.rootless) == \
        ("docker", "20.10.24+dfsg1", "classic", False)
    containerd = edd.engine_from_info("docker", CONTAINERD_INFO)
    assert (containerd.image_store, containerd.rootless) == ("containerd", True)
    podman = edd.engine_from_info("podman", PODMAN_INFO)
    assert (podman.kind, podman.version, podman.image_store, podman.rootless) == \
        ("podman", "4.3.1", "podman", True)
    assert (classic.thin_layouts, containerd.thin_layouts, podman.thin_layouts) == \
        (("legacy", "oci"), ("oci",), ())
    assert classic.runs_healthchecks and not podman.runs_healthchecks
    assert str(podman) == "podman 4.3.1 (image store: podman, rootless)"


# ---------------------------------------------------------------------------
# What the CLIs print: missing objects, load output and failures
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("message, names", [
    ("Error: No such container: web.edd-old", {"web.edd-old"}),
    ("Error: No such image: edd/web:previous", {"edd/web:previous"}),
    ("Error: No such object: web", {"web"}),
    ("Error: inspecting object: no such container web.edd-old", {"web.edd-old"}),
    ("Error: inspecting object: edd/web:previous: image not known", {"edd/web:previous"}),
    ("Error: edd/web:previous: image not known", {"edd/web:previous"}),
])
def test_missing_objects_in_both_engines_words(message, names):
    assert edd._is_missing(message)
    assert edd._missing_names(message) == names


def test_a_real_failure_is_not_taken_for_a_missing_object():
    assert not edd._is_missing("Error: cannot connect to Podman socket")
    assert edd._is_missing('Error: no container with name or ID "web" found: no such container')


@pytest.mark.parametrize("returncode, output, failure", [
    (0, "Loaded image: website:latest\n", None),
    (0, "Loaded image ID: sha256:" + "a" * 64 + "\n", None),
    # Docker 28+ on the containerd store: imported but not unpacked, and exit 0
    # (moby daemon/containerd/image_exporter.go).
    (0, "Loaded image: website:latest\nError unpacking image website:latest: "
        "failed to extract layer: no space left on device\n",
     "Error unpacking image website:latest: failed to extract layer: no space left on device"),
    (1, "Error response from daemon: unexpected EOF\n", "unexpected EOF"),
    (125, "Error: payload does not match any of the supported image formats:\n"
          " * oci: initializing source oci:/var/tmp/podman1:: open /var/tmp/podman1/index.json: "
          "not a directory\n"
          " * docker-archive: loading tar component manifest.json: archive/tar: invalid tar "
          "header\n * dir: open /var/tmp/podman1/manifest.json: not a directory\n",
     "not an image archive (docker-archive: loading tar component manifest.json: "
     "archive/tar: invalid tar header)"),
    (1, "", "exit 1"),
])
def test_load_failure(returncode, output, failure):
    assert edd.load_failure(returncode, output) == failure


def test_podman_load_output_names_as_docker_spells_them():
    docker = edd.Docker("podman")
    docker.engine = edd.Engine("podman")
    output = ("Getting image source signatures\nCopying blob sha256:4019a0\n"
              "Loaded image: localhost/website:latest\n"
              "Loaded image: docker.io/library/nginx:1\n"
              "Loaded image: sha256:" + "b" * 64 + "\n")
    assert docker.loaded_refs(output) == ["website:latest", "docker.io/library/nginx:1",
                                          "sha256:" + "b" * 64]


def test_podman_json_reads_as_dockers():
    docker = edd.Docker("podman")
    docker.engine = edd.Engine("podman")
    container = {"Id": "c" * 64, "Name": "web", "Image": "d" * 64,
                 "State": {"Status": "running", "Running": True,
                           "Health": {"Status": "", "FailingStreak": 0, "Log": None}},
                 "Config": {"Image": "localhost/edd/web:current"}}
    container = docker._normalize("container", container)
    assert container["Id"] == "c" * 64                  # container ids stay bare hex
    assert container["Image"] == "sha256:" + "d" * 64
    assert container["State"]["Health"] is None
    assert container["Config"]["Image"] == "edd/web:current"
    image = docker._normalize("image", {"Id": "d" * 64})
    assert image["Id"] == "sha256:" + "d" * 64
    docker_container = edd.Docker()._normalize("container", {"Name": "/web", "Image": "x"})
    assert docker_container["Name"] == "web"


# ---------------------------------------------------------------------------
# gzip: podman's load takes no .tar.gz, so edd always gunzips (see also
# test_archive.py's test_gunzip_chunks)
# ---------------------------------------------------------------------------

def test_gunzip_pieces_are_bounded():
    pieces = list(edd.gunzip_chunks([gzip.compress(b"\0" * (5 * edd.BUFFER_SIZE))]))
    assert max(len(piece) for piece in pieces) <= edd.BUFFER_SIZE
    assert sum(len(piece) for piece in pieces) == 5 * edd.BUFFER_SIZE


# ---------------------------------------------------------------------------
# On each engine
# ---------------------------------------------------------------------------

def test_health_and_check_name_the_engine(edd_factory, docker):
    edd_process = edd_factory.start()
    reply = https_request(edd_process, "GET", "/v1/health")
    assert reply.status == 200, reply
    engine = reply.json["engine"]
    expected = ("podman", "podman") if is_podman() else ("docker", None)
    assert engine["name"] == expected[0], engine
    assert engine["version"] == docker, engine
    assert engine["image_store"] in ([expected[1]] if expected[1] else ["classic", "containerd"])
    assert "engine: %s %s" % (engine["name"], engine["version"]) in edd_process.log()

    done = subprocess.run([sys.executable, str(EDD), "--check", "--config",
                           str(edd_process.config_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert done.returncode == 0, done.stderr
    assert "%s %s (image store: %s" % (engine["name"], engine["version"],
                                       engine["image_store"]) in done.stdout, done.stdout


def rewrite_json(archive, destination, member_name, edit):
    """A copy of a tar `archive` in which the JSON member `member_name` is edit(value)."""
    with tarfile.open(str(archive)) as source, tarfile.open(str(destination), "w") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name == member_name:
                data = json.dumps(edit(json.loads(data))).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return destination


def without_ref_names(index):
    for manifest in index["manifests"]:
        manifest.pop("annotations", None)
    return index


def test_archive_without_names_deploys_by_its_id(edd_factory, make_image, docker, tmp_path):
    # The load path of issue 9 strips every name: the engine then prints only
    # the id (docker: "Loaded image ID: sha256:…", podman: "Loaded image: sha256:…").
    archive = rewrite_archive(make_image(V1, content=V1_TEXT), tmp_path / "nameless.tar",
                              tags=[])
    deployment = edd_factory.deployment()
    edd_process = edd_factory.start([deployment])
    reply = curl(edd_process, "POST", "/v1/deployments/%s/load" % deployment.name,
                 upload=archive)
    assert reply.status == 200, reply.body
    loaded_id = reply.json["loaded"]["image_id"]
    assert reply.json["loaded"]["images"] == [loaded_id]
    assert loaded_id == image_id("edd/%s:current" % deployment.name)
    assert fetch(deployment.port) == V1_TEXT


def test_load_that_reports_an_unpack_error_is_a_failure(edd_factory, make_image, docker,
                                                        tmp_path):
    # A stand-in CLI: Docker 28+ on the containerd store prints "Error unpacking
    # image" and exits 0 when a layer cannot be unpacked, which the engine here
    # cannot be made to do. Every other command goes to the real engine.
    fake = tmp_path / "fake-cli"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = load ]; then cat >/dev/null; "
                    "echo 'Loaded image: %s'; echo 'Error unpacking image %s: "
                    "failed to extract layer: no space left on device'; exit 0; fi\n"
                    "exec %s \"$@\"\n" % (V1, V1, docker.cli))
    fake.chmod(0o755)
    deployment = edd_factory.deployment()
    edd_process = edd_factory.start([deployment])
    first = curl(edd_process, "POST", "/v1/deployments/%s/load" % deployment.name,
                 upload=make_image(V1, content=V1_TEXT))
    assert first.status == 200, first.body
    edd_process.reload(dict(edd_process.config, docker=str(fake)))
    wait_for(lambda: "reloaded" in edd_process.log(), message="the reload")
    reply = curl(edd_process, "POST", "/v1/deployments/%s/load" % deployment.name,
                 upload=make_image(run_tag("edd-engines-site", "v2"), content="engines v2\n"))
    assert reply.status == 400, reply.body
    assert "no space left on device" in reply.json["error"], reply.json
    assert fetch(deployment.port) == V1_TEXT


@pytest.mark.engines("podman", reason="docker 20.10 writes no OCI archive; podman's "
                                      "`save --format oci-archive` does")
def test_a_pure_oci_archive_is_refused_in_words(edd_factory, make_image, docker, tmp_path):
    # `podman save --format oci-archive` writes no manifest.json; edd reads the
    # archive's images and layers from manifest.json (which `docker save` and
    # podman's default docker-archive format write), so it refuses such an
    # archive before the engine sees its end, and what runs stays.
    docker_cli("load", "-i", make_image(V1, content=V1_TEXT))
    oci = tmp_path / "oci.tar"
    docker_cli("save", "--format", "oci-archive", "-o", oci, V1)
    docker_cli("rmi", V1)
    stripped = rewrite_json(oci, tmp_path / "oci-nameless.tar", "index.json",
                            without_ref_names)
    deployment = edd_factory.deployment()
    edd_process = edd_factory.start([deployment])
    first = curl(edd_process, "POST", "/v1/deployments/%s/load" % deployment.name,
                 upload=make_image(V1, content=V1_TEXT))
    assert first.status == 200, first.body
    for archive in (oci, stripped):
        reply = curl(edd_process, "POST", "/v1/deployments/%s/load" % deployment.name,
                     upload=archive)
        assert reply.status == 400, reply.body
        assert "no manifest.json" in reply.json["error"], reply.json
        assert fetch(deployment.port) == V1_TEXT


@pytest.mark.engines("podman", reason="a client whose local engine is podman")
def test_edd_push_from_a_podman_client_to_a_podman_host(edd_factory, make_image, docker):
    # A Fedora laptop pushing to a podman host: `--docker podman` makes the
    # client inspect and save with podman; the host answers thin: false, so the
    # whole image goes, and the page changes.
    docker_cli("load", "-i", make_image(V1, content=V1_TEXT))
    deployment = edd_factory.deployment()
    edd_process = edd_factory.start([deployment])
    crt, key = edd_factory.pki.client("alice")
    url = "%s/v1/deployments/%s" % (edd_process.url, deployment.name)
    argv = [sys.executable, str(EDD), "push", "--cert", str(crt), "--key", str(key),
            "--cacert", str(edd_factory.pki.ca), "--json"]
    try:
        for extra in ([], ["--docker", "podman"]):
            proc = subprocess.run(argv + extra + [V1, url], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True,
                                  timeout=300, env=dict(os.environ, EDD_DOCKER="docker"))
            if not extra:
                # docker has no such image: the client says so and sends nothing.
                assert proc.returncode == 2, proc.stderr
                assert "no image" in proc.stderr, proc.stderr
                continue
            assert proc.returncode == 0, proc.stdout + proc.stderr + edd_process.log()
            answer = json.loads(proc.stdout)
            assert answer["layers_skipped"] == 0 and answer["bytes_sent"] > 0, answer
        assert fetch(deployment.port) == V1_TEXT
    finally:
        docker_cli("rmi", V1, check=False)
