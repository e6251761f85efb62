"""Issue 9: an upload changes its own deployment and nothing else (real engine).

`docker load` applies the names an archive carries and takes layers the host
already has instead of the archive's; edd removes the names on the way in, then
allows a layer the archive does not hold only if the deployment's own images
have it. Each test fetches the page that the containers serve.
"""
import re
import secrets
import threading

import pytest

from conftest import (assert_ok, push, archive_layer_members, commit_image, container_state, curl,
                      docker_cli, fetch, image_id, image_layers, oci_archive,
                      rewrite_archive, run_tag, save_archive, unreachable)

pytestmark = pytest.mark.docker

PLAIN_AND_GZIP = pytest.mark.parametrize("gzip", [False, True], ids=["tar", "tar.gz"])


def edd_tag(deployment, which="current"):
    return image_id("edd/%s:%s" % (deployment.name, which))


def host_load(archive):
    """Load an archive onto the host by hand, as another workload would have."""
    docker_cli("load", "-i", archive)


# ---------------------------------------------------------------------------
# Archive names: never applied
# ---------------------------------------------------------------------------

@PLAIN_AND_GZIP
def test_archive_tags_change_no_tag_on_the_host(edd_factory, make_image, tmp_path, gzip):
    other = edd_factory.deployment(clients=["bob"])
    mine = edd_factory.deployment(clients=["alice"])
    edd = edd_factory.start([other, mine])
    for version in ("v1", "v2"):
        archive = make_image(run_tag("edd-iso-other", version), content="other %s\n" % version)
        assert_ok(push(edd, other, archive, cert="bob"))
    assert fetch(other.port) == "other v2\n"
    workload_tag = run_tag("edd-iso-workload")
    host_load(make_image(workload_tag, content="another workload\n"))
    watched = ["edd/%s:previous" % other.name, "edd/%s:current" % other.name, workload_tag]
    before = {ref: image_id(ref) for ref in watched}
    assert all(before.values()), before

    # One archive per name, each pushed by a client that may use only `mine`.
    for number, name in enumerate(watched):
        evil = make_image(run_tag("edd-iso-evil", "v%d" % number), content="evil %d\n" % number)
        renamed = rewrite_archive(evil, tmp_path / ("evil-%d.tar" % number), tags=[name],
                                  gzip=gzip)
        body = assert_ok(push(edd, mine, renamed))
        assert {ref: image_id(ref) for ref in watched} == before, name
        assert fetch(mine.port) == "evil %d\n" % number
        assert body["image_id"] == make_image.image_id(evil)
        assert edd_tag(mine) == make_image.image_id(evil)
        assert body["ignored_tags"] == [name]
        assert body["loaded"]["images"] == [name]

    assert fetch(other.port) == "other v2\n"
    assert_ok(curl(edd, "POST", "/v1/deployments/%s/rollback" % other.name, cert="bob"))
    assert fetch(other.port) == "other v1\n"


# ---------------------------------------------------------------------------
# Layers the archive leaves out
# ---------------------------------------------------------------------------

@pytest.fixture
def layered(make_image, tmp_path):
    """Three images sharing layers: base, secret (base + 1), top (secret + 1); the
    archives base.tar, secret.tar, top.tar; none of them left on the host."""
    version = secrets.token_hex(4)
    tags = {name: run_tag("edd-iso-" + name, version) for name in ("base", "secret", "top")}
    host_load(make_image(tags["base"], content="base page\n"))
    ids = {"base": image_id(tags["base"])}
    ids["secret"] = commit_image(tags["base"], tags["secret"], "website secret page\n")
    ids["top"] = commit_image(tags["secret"], tags["top"], "tenant page\n")
    layers = {name: image_layers(tag) for name, tag in tags.items()}
    archives = {name: save_archive(tmp_path / (name + ".tar"), tag) for name, tag in tags.items()}
    docker_cli("rmi", tags["top"], tags["secret"], tags["base"])
    assert layers["top"][:2] == layers["secret"] and layers["secret"][:1] == layers["base"]
    return {"ids": ids, "layers": layers, "archives": archives}


def thin_archive(layered, path, how, gzip):
    """top.tar without the files of its two lower layers (or with garbage in them)."""
    lower = archive_layer_members(layered["archives"]["top"])[:2]
    if how == "omitted":
        return rewrite_archive(layered["archives"]["top"], path, drop=lower, gzip=gzip)
    return rewrite_archive(layered["archives"]["top"], path, gzip=gzip,
                           replace={name: b"not the layer\n" * 100 for name in lower})


@pytest.mark.engines("podman", reason="podman loads no archive that omits layers "
                                      "(podman#8132); docker does, so edd checks them")
def test_podman_refuses_a_thin_archive_and_nothing_is_left(edd_factory, layered, tmp_path):
    website = edd_factory.deployment()
    tenant = edd_factory.deployment()
    edd = edd_factory.start([website, tenant])
    assert_ok(push(edd, website, layered["archives"]["secret"]))
    reply = push(edd, tenant, thin_archive(layered, tmp_path / "thin.tar", "omitted", False))
    assert reply.status == 400, reply
    assert "missing" in reply.json["error"], reply.json
    assert image_id(layered["ids"]["top"]) is None
    assert container_state(tenant.name) is None and unreachable(tenant.port)
    assert fetch(website.port) == "website secret page\n"


@pytest.mark.engines("docker", reason="podman refuses every thin archive: see the test above")
@pytest.mark.parametrize("how, gzip", [("omitted", False), ("omitted", True),
                                       ("garbage", False)])
def test_an_archive_may_not_borrow_another_deployments_layers(edd_factory, layered, tmp_path,
                                                              how, gzip):
    website = edd_factory.deployment(clients=["bob"])
    tenant = edd_factory.deployment(clients=["alice"])
    edd = edd_factory.start([website, tenant])
    assert_ok(push(edd, website, layered["archives"]["secret"], cert="bob"))
    assert fetch(website.port) == "website secret page\n"
    thin = thin_archive(layered, tmp_path / "thin.tar", how, gzip)
    top_id = layered["ids"]["top"]

    # A deployment with nothing of its own: refused, and nothing is left behind.
    reply = push(edd, tenant, thin)
    assert reply.status == 403, reply
    assert reply.json["error"].startswith(
        "the archive omits layers that deployment %s does not have" % tenant.name), reply.json
    assert image_id(top_id) is None, "the refused upload's image was left on the host"
    assert container_state(tenant.name) is None and unreachable(tenant.port)
    assert edd_tag(tenant) is None and edd_tag(tenant, "previous") is None
    assert re.search(r"audit .*deployment=%s action=load status=403 .*refused=foreign-layers"
                     % tenant.name, edd.log()), edd.log()

    # Owning the base layer is not enough: the whole chain must be its own.
    assert_ok(push(edd, tenant, layered["archives"]["base"]))
    assert fetch(tenant.port) == "base page\n"
    assert push(edd, tenant, thin).status == 403
    assert fetch(tenant.port) == "base page\n"
    assert edd_tag(tenant) == layered["ids"]["base"]
    assert image_id(top_id) is None

    # The website's own layers may be left out of the website's uploads.
    assert fetch(website.port) == "website secret page\n"
    body = assert_ok(push(edd, website, thin, cert="bob"))
    assert body["image_id"] == top_id
    assert fetch(website.port) == "tenant page\n"
    assert edd_tag(website, "previous") == layered["ids"]["secret"]


def test_a_whole_archive_may_carry_layers_the_host_has(edd_factory, layered):
    # Sending the bytes is what counts: the tenant sends every layer, some of
    # which the website's images hold on this host too.
    website = edd_factory.deployment(clients=["bob"])
    tenant = edd_factory.deployment(clients=["alice"])
    edd = edd_factory.start([website, tenant])
    assert_ok(push(edd, website, layered["archives"]["secret"], cert="bob"))
    assert_ok(push(edd, tenant, layered["archives"]["top"]))
    assert fetch(tenant.port) == "tenant page\n"
    assert fetch(website.port) == "website secret page\n"


def test_oci_layout_with_compressed_layers(edd_factory, layered, make_image, tmp_path):
    # What a containerd-store engine saves: layer blobs gzip'd and named by the
    # compressed digest, names in index.json as well as in manifest.json.
    website = edd_factory.deployment(clients=["bob"])
    tenant = edd_factory.deployment(clients=["alice"])
    edd = edd_factory.start([website, tenant])
    workload_tag = run_tag("edd-iso-oci-workload")
    host_load(make_image(workload_tag, content="oci workload\n"))
    workload_id = image_id(workload_tag)
    names = ["edd/%s:current" % website.name, workload_tag]
    oci_secret = oci_archive(layered["archives"]["secret"], tmp_path / "secret.tar", names)
    body = assert_ok(push(edd, website, oci_secret, cert="bob"))
    assert fetch(website.port) == "website secret page\n"
    assert body["image_id"] == layered["ids"]["secret"]
    assert image_id(workload_tag) == workload_id
    assert sorted(body["ignored_tags"]) == sorted(names)

    # All layers sent, gzip'd: the tenant may carry layers the website has.
    oci_top = oci_archive(layered["archives"]["top"], tmp_path / "top.tar", ["app:v2"])
    assert_ok(push(edd, tenant, oci_top))
    assert fetch(tenant.port) == "tenant page\n"
    assert_ok(curl(edd, "DELETE", "/v1/deployments/%s" % tenant.name))
    docker_cli("rmi", "edd/%s:current" % tenant.name)
    assert image_id(layered["ids"]["top"]) is None

    # Without its lower blobs it borrows them: refused for the tenant.
    lower = archive_layer_members(oci_top)[:2]
    thin = rewrite_archive(oci_top, tmp_path / "thin.tar", drop=lower)
    assert push(edd, tenant, thin).status == 403
    assert image_id(layered["ids"]["top"]) is None and container_state(tenant.name) is None
    assert_ok(push(edd, website, thin, cert="bob"))
    assert fetch(website.port) == "tenant page\n"


# ---------------------------------------------------------------------------
# Several images in one archive
# ---------------------------------------------------------------------------

@PLAIN_AND_GZIP
def test_multi_image_archive_with_image_choice(edd_factory, make_image, gzip):
    first, second = run_tag("edd-iso-multi-a"), run_tag("edd-iso-multi-b")
    archive = make_image.multi([(first, "iso multi a\n"), (second, "iso multi b\n")], gzip=gzip)
    first_id, second_id = make_image.image_ids(archive)
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])

    reply = push(edd, deployment, archive)
    assert reply.status == 400, reply
    assert first in reply.json["error"] and second in reply.json["error"], reply.json
    assert image_id(first_id) is None and image_id(second_id) is None
    assert container_state(deployment.name) is None

    body = assert_ok(push(edd, deployment, archive, query="?image=" + second))
    assert fetch(deployment.port) == "iso multi b\n"
    assert body["image_id"] == second_id and edd_tag(deployment) == second_id
    assert sorted(body["ignored_tags"]) == sorted([first, second])
    # The names stay out of the host, and the image not chosen does not stay.
    assert image_id(first) is None and image_id(second) is None
    assert image_id(first_id) is None

    reply = push(edd, deployment, archive, query="?image=nosuch:latest")
    assert reply.status == 400 and "nosuch:latest" in reply.json["error"], reply
    assert fetch(deployment.port) == "iso multi b\n"
    assert image_id(first_id) is None


def test_a_failed_gate_takes_its_image_away(edd_factory, make_image):
    deployment = edd_factory.deployment()
    edd = edd_factory.start([deployment])
    good = make_image(run_tag("edd-iso-gate", "v1"), content="gate v1\n")
    assert_ok(push(edd, deployment, good))
    exits = make_image(run_tag("edd-iso-gate", "v2"), exits=True)
    reply = push(edd, deployment, exits)
    assert reply.status == 502 and reply.json["restored"] is True, reply
    assert fetch(deployment.port) == "gate v1\n"
    assert image_id(make_image.image_id(exits)) is None
    assert edd_tag(deployment) == make_image.image_id(good)


# ---------------------------------------------------------------------------
# Two clients, one archive name, at the same time
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gzip, rounds", [(False, 10), (True, 4)], ids=["tar", "tar.gz"])
def test_concurrent_pushes_under_one_archive_name_each_deploy_their_own(
        edd_factory, make_image, tmp_path, gzip, rounds):
    shared = run_tag("edd-iso-shared", "latest")
    team_a = edd_factory.deployment(clients=["alice"])
    team_b = edd_factory.deployment(clients=["bob"])
    edd = edd_factory.start([team_a, team_b])
    archives = {}
    for team in ("a", "b"):
        for version in (1, 2):
            built = make_image(run_tag("edd-iso-team-" + team, "v%d" % version),
                               content="team %s v%d\n" % (team, version))
            archives[team, version] = rewrite_archive(
                built, tmp_path / ("%s%d.tar" % (team, version)), tags=[shared], gzip=gzip)

    for number in range(rounds):
        version = number % 2 + 1
        replies = {}

        def send(team, deployment, cert):
            replies[team] = push(edd, deployment, archives[team, version], cert=cert)
        threads = [threading.Thread(target=send, args=("a", team_a, "alice")),
                   threading.Thread(target=send, args=("b", team_b, "bob"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert_ok(replies["a"])
        assert_ok(replies["b"])
        assert (fetch(team_a.port), fetch(team_b.port)) == \
            ("team a v%d\n" % version, "team b v%d\n" % version), "round %d" % number
    assert image_id(shared) is None
