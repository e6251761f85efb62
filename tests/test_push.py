"""`edd.py push` and POST /v1/deployments/NAME/layers (issue 12).

The engine tests build images that share a base layer the way a user's builds do
(`docker create BASE`, `docker cp`, `docker commit`), push them with the real
client over a real mTLS socket, and check what the container serves and how many
archive bytes crossed the wire. Host and client share this machine's engine.
"""

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import (BUSYBOX, EDD, EXITS_CMD, PROMPT_STOP_CMD, docker_cli, fetch,
                      https_request, run_tag, curl)

spec = importlib.util.spec_from_file_location("edd", str(EDD))
edd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(edd)

MIB = 1 << 20
BASE_RANDOM = 6 * MIB          # the layer a thin push leaves out
APP_RANDOM = 256 << 10         # the layer it sends


# ---------------------------------------------------------------------------
# Images that share a base, as builds do
# ---------------------------------------------------------------------------

def _tar(files):
    """A tar (bytes) of {path: (data, mode)}; directories are made as needed."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        made = set()
        for path, (data, mode) in sorted(files.items()):
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/".join(parts[:depth])
                if folder not in made:
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    made.add(folder)
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_layered(base_tag, apps):
    """base_tag: busybox, a shell, random data; each (tag, page, cmd) of `apps`:
    base_tag plus a layer with /www/index.html = page and some random data."""
    base = _tar({"bin/busybox": (BUSYBOX.read_bytes(), 0o755),
                 "data/base.bin": (os.urandom(BASE_RANDOM), 0o644),
                 "www/index.html": (b"base\n", 0o644), "tmp/.keep": (b"", 0o644)})
    proc = subprocess.run(["docker", "import", "--change", "CMD " + json.dumps(PROMPT_STOP_CMD),
                           "-", base_tag], input=base, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docker_cli("run", "--rm", base_tag, "/bin/busybox", "--install", "-s", "/bin", check=False)
    for tag, page, cmd in apps:
        container = docker_cli("create", base_tag).stdout.strip()
        try:
            layer = _tar({"www/index.html": (page.encode(), 0o644),
                          "app/app.bin": (os.urandom(APP_RANDOM), 0o644)})
            proc = subprocess.run(["docker", "cp", "-", container + ":/"], input=layer,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            assert proc.returncode == 0, proc.stderr
            docker_cli("commit", "-c", "CMD " + json.dumps(cmd), container, tag)
        finally:
            docker_cli("rm", "-f", container, check=False)


@pytest.fixture(scope="module")
def layered(docker):
    """{"base", "v1", "v2", "v3" (exits at once)}: tags of images sharing one base."""
    tags = {key: run_tag("push-" + key, "t") for key in ("base", "v1", "v2", "v3")}
    build_layered(tags["base"], [(tags["v1"], "push v1\n", PROMPT_STOP_CMD),
                                 (tags["v2"], "push v2\n", PROMPT_STOP_CMD),
                                 (tags["v3"], "push v3\n", EXITS_CMD)])
    yield tags
    docker_cli("rmi", *tags.values(), check=False)


def layers_of(ref):
    return json.loads(docker_cli("image", "inspect", "--format", "{{json .RootFS.Layers}}",
                                 ref).stdout)


def layer_bytes(ref, index):
    """The size of layer `index` of `ref` in a `docker save` archive (its tar file)."""
    saved = subprocess.run(["docker", "save", ref], stdout=subprocess.PIPE, check=True,
                           timeout=120).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        return tar.getmember(manifest[0]["Layers"][index]).size, len(saved)


def edd_push(server, image, name, *options, cert="alice", env=None, url=None):
    """Run `edd.py push` as a user would; return (exit status, JSON or None, stderr)."""
    pki = server.factory.pki
    argv = [sys.executable, str(EDD), "push"]
    if cert:
        crt, key = pki.client(cert)
        argv += ["--cert", str(crt), "--key", str(key)]
    argv += ["--cacert", str(pki.ca)] + list(options)
    argv += [image, url or "%s/v1/deployments/%s" % (server.url, name)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300, env=env)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    return proc.returncode, answer, proc.stdout + proc.stderr


def running_v1(edd_factory, layered, **toplevel):
    """A started edd whose one deployment runs v1, pushed with edd push; (edd, deployment)."""
    deployment = edd_factory.deployment()
    server = edd_factory.start([deployment], **toplevel)
    assert edd_push(server, layered["v1"], deployment.name)[0] == 0
    assert fetch(deployment.port) == "push v1\n"
    return server, deployment


REAL_DOCKER = shutil.which("docker")

# LEAD (merge into i13): these tests predate podman in the suite (issue 14); their
# images are built and saved with the docker CLI. i12 makes them engine-aware.
pytestmark = pytest.mark.engines("docker", reason="images built with the docker CLI")


def fake_docker(path, script):
    """A `docker` at `path` that runs the sh `script`, then the real docker with the
    same arguments; returns `path`. For faults the real engine cannot produce on cue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n%s\nexec %s \"$@\"\n" % (script, REAL_DOCKER))
    path.chmod(0o755)
    return path


def on_path(folder):
    return dict(os.environ, PATH="%s:%s" % (folder, os.environ["PATH"]))


# ---------------------------------------------------------------------------
# The thin push, end to end
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_v2_sharing_its_base_sends_only_its_new_layer(edd_factory, layered):
    deployment = edd_factory.deployment()
    server = edd_factory.start([deployment])
    status, first, _ = edd_push(server, layered["v1"], deployment.name, "--json")
    assert status == 0, first
    assert first["layers_skipped"] == 0                 # nothing there yet: everything
    assert fetch(deployment.port) == "push v1\n"

    app_layer, whole = layer_bytes(layered["v2"], -1)
    status, answer, output = edd_push(server, layered["v2"], deployment.name, "--json")
    assert status == 0, output
    assert answer["image_id"] == docker_cli("image", "inspect", "--format", "{{.Id}}",
                                            layered["v2"]).stdout.strip()
    assert answer["layers_skipped"] == len(layers_of(layered["v2"])) - 1
    assert answer["layers_sent"] == 1
    # The app layer, its tar header and the archive's config and manifest: a few KiB.
    assert app_layer <= answer["bytes_sent"] <= app_layer + 64 * 1024, (answer, app_layer)
    assert answer["bytes_sent"] < whole - BASE_RANDOM
    assert fetch(deployment.port) == "push v2\n"
    assert "the archive omits" not in server.log()


@pytest.mark.docker
def test_already_running_sends_nothing_and_force_redeploys(edd_factory, layered):
    server, deployment = running_v1(edd_factory, layered)
    status, answer, _ = edd_push(server, layered["v1"], deployment.name, "--json")
    assert (status, answer["bytes_sent"], answer["already_running"]) == (0, 0, True)
    status, _, output = edd_push(server, layered["v1"], deployment.name)
    assert status == 0 and "already runs" in output
    started = https_request(server, "GET", "/v1/deployments/" + deployment.name).json
    status, answer, output = edd_push(server, layered["v1"], deployment.name, "--force",
                                      "--json")
    assert status == 0, output
    assert answer["bytes_sent"] > 0 and answer["layers_sent"] == 0
    assert answer["started_at"] != started["started_at"]
    assert fetch(deployment.port) == "push v1\n"


@pytest.mark.docker
def test_full_sends_every_layer(edd_factory, layered):
    server, deployment = running_v1(edd_factory, layered)
    _, whole = layer_bytes(layered["v2"], -1)
    status, answer, output = edd_push(server, layered["v2"], deployment.name, "--full",
                                      "--json")
    assert status == 0, output
    assert answer["bytes_sent"] == whole and answer["layers_skipped"] == 0
    assert fetch(deployment.port) == "push v2\n"


@pytest.mark.docker
def test_failed_deploy_exits_1_and_the_old_page_stays(edd_factory, layered):
    server, deployment = running_v1(edd_factory, layered)
    status, _, output = edd_push(server, layered["v3"], deployment.name)
    assert status == 1, output
    assert "edd push: error: the host answered 502" in output and "Traceback" not in output
    assert fetch(deployment.port) == "push v1\n"


@pytest.mark.docker
@pytest.mark.parametrize("loss, says", [
    ("deleted", "docker load failed"),          # no image on the host has the layer
    ("disowned", "the archive omits layers"),   # others have it, the deployment not
])
def test_layer_gone_after_layers_answer_falls_back_to_full(edd_factory, layered, tmp_path,
                                                           loss, says):
    # Fault injection: the host must lose the layer between its /layers answer and
    # the upload, which the engine does not do on cue. The client's `docker` is a
    # wrapper whose `save` (run between the two), once the archive is written,
    # removes the deployment's container and image, and for "deleted" also every
    # other image that holds the base layer.
    server, deployment = running_v1(edd_factory, layered)
    copy = run_tag("push-gone", "v2")
    docker_cli("tag", layered["v2"], copy)
    others = [layered[k] for k in ("v1", "v2", "v3", "base")] + [copy]
    wrapper = fake_docker(tmp_path / "bin" / "docker", (
        'if [ "$1" = save ]; then\n  {docker} "$@" || exit $?\n'
        '  {docker} rm -f {name} >/dev/null\n  {docker} rmi edd/{name}:current {others} '
        '>/dev/null\n  exit 0\nfi').format(docker=REAL_DOCKER, name=deployment.name,
                                             others=" ".join(others) if loss == "deleted"
                                             else ""))
    try:
        status, answer, output = edd_push(server, copy, deployment.name, "--json",
                                          env=on_path(wrapper.parent))
    finally:
        if loss == "deleted":
            build_layered(layered["base"], [(layered[k], "push %s\n" % k, cmd) for k, cmd in
                                            (("v1", PROMPT_STOP_CMD), ("v2", PROMPT_STOP_CMD),
                                             ("v3", EXITS_CMD))])
        docker_cli("rmi", copy, check=False)
    assert status == 0, output
    assert "sending the whole image" in output
    assert answer["fallback"].startswith("the thin upload failed: " + says), answer
    assert answer["layers_skipped"] == 0
    assert fetch(deployment.port) == "push v2\n"


@pytest.mark.docker
def test_thin_false_sends_the_whole_image_and_says_so(edd_factory, layered, tmp_path):
    # Fault injection: this engine is the classic store; a wrapper that answers
    # `--version` like podman's docker shim stands for an engine that cannot load
    # an archive without layers (everything else goes to the real docker).
    wrapper = fake_docker(tmp_path / "podman-docker",
                          "[ \"$1\" = --version ] && echo 'podman version 4.3.1' && exit 0")
    server, deployment = running_v1(edd_factory, layered, docker=str(wrapper))
    _, whole = layer_bytes(layered["v2"], -1)
    status, answer, output = edd_push(server, layered["v2"], deployment.name, "--json")
    assert status == 0, output
    assert "does not load archives without layers" in output
    assert answer["bytes_sent"] == whole and "without layers" in answer["fallback"]
    assert fetch(deployment.port) == "push v2\n"


def ustar(files):
    """A tar (bytes) of the regular files [(name, data)], in that order, as docker writes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def relayout(legacy, layout):
    """The legacy `docker save` archive `legacy` (bytes) rewritten as `layout` writes
    it: "oci" (Docker 25+ on the classic store: blobs named by diff ID) or
    "containerd" (the containerd store: gzip'd blobs named by their own digest)."""
    with tarfile.open(fileobj=io.BytesIO(legacy)) as tar:
        entry = json.load(tar.extractfile("manifest.json"))[0]
        config = tar.extractfile(entry["Config"]).read()
        layers = [tar.extractfile(tar.getmember(name)).read() for name in entry["Layers"]]
    files, names = [], []
    for layer in layers:
        blob = gzip.compress(layer, mtime=0) if layout == "containerd" else layer
        names.append("blobs/sha256/" + _sha(blob).split(":")[1])
        files.append((names[-1], blob))
    config_name = "blobs/sha256/" + _sha(config).split(":")[1]
    files += [(config_name, config), ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
              ("index.json", b'{"schemaVersion": 2, "manifests": []}'),
              ("manifest.json", json.dumps([dict(entry, Config=config_name,
                                                  Layers=names)]).encode())]
    return ustar(files), files[len(layers) - 1][1]


@pytest.mark.docker
@pytest.mark.parametrize("layout", ["oci", "containerd"])
def test_thin_push_of_other_engines_archives(edd_factory, layered, tmp_path, layout):
    # This machine's docker writes only the legacy layout, so the client's `docker`
    # is a wrapper whose `save` answers with the same image in `layout` (everything
    # else goes to the real docker). The host here is the classic store, which
    # loads either layout without the layers it has.
    server, deployment = running_v1(edd_factory, layered)
    legacy = subprocess.run(["docker", "save", layered["v2"]], stdout=subprocess.PIPE,
                            check=True, timeout=120).stdout
    archive, app_blob = relayout(legacy, layout)
    (tmp_path / "v2.tar").write_bytes(archive)
    wrapper = fake_docker(tmp_path / "bin" / "docker",
                          "[ \"$1\" = save ] && exec cat %s" % (tmp_path / "v2.tar"))
    status, answer, output = edd_push(server, layered["v2"], deployment.name, "--json",
                                      env=on_path(wrapper.parent))
    assert status == 0, output
    assert answer["layers_sent"] == 1 and "fallback" not in answer
    assert len(app_blob) <= answer["bytes_sent"] <= len(app_blob) + 64 * 1024
    assert fetch(deployment.port) == "push v2\n"


# ---------------------------------------------------------------------------
# /layers: what it answers and to whom
# ---------------------------------------------------------------------------

@pytest.mark.docker
def test_layers_answers_only_about_the_deployments_own_images(edd_factory, layered):
    website, other = edd_factory.deployment(), edd_factory.deployment(clients=["alice"])
    server = edd_factory.start([website, other])
    assert edd_push(server, layered["v1"], website.name)[0] == 0
    query = json.dumps({"image_id": "sha256:" + "0" * 64, "layers": layers_of(layered["v2"])})
    reply = https_request(server, "POST", "/v1/deployments/%s/layers" % website.name,
                          body=query, headers={"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    assert reply.json["have"] == len(layers_of(layered["v2"])) - 1
    assert reply.json["thin"] is True and reply.json["running"] is False
    # The engine holds the base (website runs it, and the client's own images), but
    # `other` does not: its answer must not say so.
    reply = https_request(server, "POST", "/v1/deployments/%s/layers" % other.name,
                          body=query, headers={"Content-Type": "application/json"})
    assert (reply.status, reply.json["have"], reply.json["image_id"]) == (200, 0, None)
    reply = https_request(server, "POST", "/v1/deployments/%s/layers" % other.name,
                          cert="bob", body=query)
    assert reply.status == 404          # a deployment bob may not use is hidden (issue 11)
    for bad in ("[]", '{"layers": ["sha256:12"]}', "not json", '{"layers": [], "x": 1}'):
        reply = https_request(server, "POST", "/v1/deployments/%s/layers" % website.name,
                              body=bad)
        assert reply.status == 400 and "error" in reply.json, bad
    reply = https_request(server, "POST", "/v1/deployments/%s/layers" % website.name,
                          body=" " * (edd.MAX_JSON_BODY + 1))
    assert reply.status == 413


@pytest.mark.docker
def test_push_refused_before_upload_exits_2(edd_factory, layered, pki):
    deployment = edd_factory.deployment(clients=["alice"])
    server = edd_factory.start([deployment])
    crt, key = pki.client("alice")
    cases = [((layered["v1"], deployment.name), {"cert": "bob"}, "404: no deployment named"),
             ((layered["v1"], "nosuch"), {}, "404: no deployment named"),
             ((layered["v1"], deployment.name), {"cert": "mallory"},
              "does the host accept this client certificate?"),
             (("no-such-image:here", deployment.name), {}, "no image 'no-such-image:here'"),
             ((layered["v1"], deployment.name, "--cacert", str(pki.other_ca)), {},
              "TLS handshake with 127.0.0.1:%d failed" % server.port)]
    for args, options, says in cases:
        status, _, output = edd_push(server, *args, **options)
        assert status == 2 and says in output, output
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert edd_push(server, layered["v1"], deployment.name)[0] == 0      # alice may
    assert fetch(deployment.port) == "push v1\n"


@pytest.mark.docker
def test_curl_push_unchanged_next_to_edd_push(edd_factory, layered, tmp_path):
    server, deployment = running_v1(edd_factory, layered)
    archive = tmp_path / "v2.tar"
    docker_cli("save", "-o", archive, layered["v2"])
    reply = curl(server, "POST", "/v1/deployments/%s/load" % deployment.name, upload=archive)
    assert reply.status == 200, reply.body
    assert fetch(deployment.port) == "push v2\n"


# ---------------------------------------------------------------------------
# The command line, without an engine
# ---------------------------------------------------------------------------

def run_edd(*args, env=None):
    proc = subprocess.run([sys.executable, str(EDD)] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                          env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args, says", [
    (["push"], "the following arguments are required"),
    (["push", "img"], "the following arguments are required"),
    (["push", "--cert", "x", "img", "http://h:1/v1/deployments/web"], "URL must look like"),
    (["push", "--cert", "x", "img", "https://h:1/v2/web"], "URL must look like"),
    (["push", "img", "https://h:1/v1/deployments/web"], "no client certificate"),
    (["push", "--bogus", "img", "https://h/v1/web"], "unrecognized arguments"),
    (["push", "--cert", "/nonexistent.crt", "img", "https://127.0.0.1:1/v1/web"],
     "--cert/--key: cannot load /nonexistent.crt"),
])
def test_bad_usage_is_one_line_and_exit_2(args, says):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDD_")}
    status, out, err = run_edd(*args, env=env)
    assert status == 2, (out, err)
    assert err.count("\n") == 1 and says in err and err.startswith("edd push: error: "), err
    assert out == ""


def test_unreachable_host_exits_2(pki):
    crt, key = pki.client("alice")
    status, out, err = run_edd("push", "--cert", str(crt), "--key", str(key), "--cacert",
                               str(pki.ca), "--json", "busybox:none",
                               "https://127.0.0.1:1/v1/deployments/web")
    # The image lookup comes first; either way it is one line and nothing was sent.
    assert status == 2 and err.count("\n") == 1, err
    assert json.loads(out)["error"]


def test_daemon_command_line_is_unchanged():
    status, out, _ = run_edd("--version")
    assert (status, out) == (0, "edd %s\n" % edd.__version__)
    status, _, err = run_edd("--config", "/nonexistent/edd.json")
    assert status == 1 and "cannot read" in err


def test_target_from_url():
    assert edd.parse_target("https://h.example:9000/v1/deployments/web") == \
        edd.Target("h.example", 9000, "web")
    assert edd.parse_target("https://h/v1/web/") == edd.Target("h", 8866, "web")
    for bad in ("https://h:0/v1/web", "https://h/v1/web?x=1", "ftp://h/v1/web",
                "https://h/v1/deployments/a/b", "https://h:99999/v1/web"):
        with pytest.raises(edd.PushError):
            edd.parse_target(bad)


# ---------------------------------------------------------------------------
# The archive filter, on hand-built archives of the three layouts
# ---------------------------------------------------------------------------

def _sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hand_built_archive(layout):
    """(archive bytes, layer tars, member names) of a two-layer image in `layout`:
    "legacy" (20.10), "oci" (25+ classic store: blobs named by diff ID, manifest.json
    last), "containerd" (gzip'd blobs named by their compressed digest)."""
    layers = [_tar({"a/base.txt": (b"base" * 1000, 0o644)}),
              _tar({"b/app.txt": (b"app" * 500, 0o644)})]
    diff_ids = [_sha(layer) for layer in layers]
    files = []
    if layout == "legacy":
        names = ["%s/layer.tar" % ("%064x" % (i + 1)) for i in range(2)]
        blobs = layers
    elif layout == "oci":
        names = ["blobs/sha256/" + d.split(":")[1] for d in diff_ids]
        blobs = layers
    else:
        blobs = [gzip.compress(layer, mtime=0) for layer in layers]
        names = ["blobs/sha256/" + _sha(blob).split(":")[1] for blob in blobs]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "config": {}}).encode()
    config_name = ("blobs/sha256/" if layout != "legacy" else "") + \
        _sha(config).split(":")[1] + ("" if layout != "legacy" else ".json")
    files += list(zip(names, blobs)) + [(config_name, config)]
    if layout != "legacy":
        files += [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                  ("index.json", b'{"schemaVersion": 2, "manifests": []}')]
    files.append(("manifest.json", json.dumps(
        [{"Config": config_name, "RepoTags": ["x:1"], "Layers": names}]).encode()))
    return ustar(files), diff_ids, names


def thin_archive(raw, have, diff_ids, layouts=("legacy", "oci")):
    """What the client sends of the archive `raw` when the host has `have` layers:
    (the members left out, the archive it sends) or (the reason, None)."""
    source = io.BytesIO(raw)
    archive = edd.index_archive(edd.file_chunks(source))
    image = edd.LocalImage("x:1", "sha256:" + "0" * 64, tuple(diff_ids), 0)
    plan = edd.thin_plan(source, archive, image, have, layouts)
    if isinstance(plan, str):
        return plan, None
    return plan, b"".join(bytes(c) for c in edd.filter_archive(
        edd.file_chunks(source), edd.Archive(), plan, strip=False))


@pytest.mark.parametrize("layout", ["legacy", "oci", "containerd"])
def test_filter_leaves_out_the_base_layer_and_keeps_the_rest(layout):
    raw, diff_ids, names = hand_built_archive(layout)
    plan, thin = thin_archive(raw, 1, diff_ids)
    assert plan == {names[0]}
    with tarfile.open(fileobj=io.BytesIO(raw)) as whole, \
            tarfile.open(fileobj=io.BytesIO(thin)) as kept:
        assert kept.getnames() == [n for n in whole.getnames() if n != names[0]]
        for name in kept.getnames():
            assert kept.extractfile(name).read() == whole.extractfile(name).read()
        left_out = whole.getmember(names[0]).size
    assert len(thin) <= len(raw) - left_out
    assert thin_archive(raw, 0, diff_ids)[0] == set()
    assert thin_archive(raw, 2, diff_ids)[0] == set(names)


def test_a_layer_linked_to_a_left_out_one_keeps_its_file():
    # Legacy layout: a repeated layer's layer.tar is a symlink to the first one's.
    layer = _tar({"x": (b"same", 0o644)})
    diff = _sha(layer)
    config = json.dumps({"rootfs": {"diff_ids": [diff, diff]}}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("a/layer.tar", layer), ("c.json", config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/layer.tar"
        tar.addfile(link)
        manifest = json.dumps([{"Config": "c.json", "RepoTags": [],
                                "Layers": ["a/layer.tar", "b/layer.tar"]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    assert thin_archive(out.getvalue(), 1, [diff, diff])[0] == set()


def test_thin_plan_refuses_a_layout_the_host_cannot_take():
    raw, diff_ids, _ = hand_built_archive("legacy")
    assert "loads only oci" in thin_archive(raw, 1, diff_ids, ("oci",))[0]
    assert "differ" in thin_archive(raw, 1, diff_ids[::-1])[0]
    raw, diff_ids, _ = hand_built_archive("containerd")
    assert "loads only" in thin_archive(raw, 1, diff_ids, ())[0]
