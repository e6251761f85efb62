"""The archive section: reading, filtering and renaming docker save / OCI tar streams.

Hand-built archives of the three layouts edd meets: docker's legacy one
(<id>/layer.tar, <id>.json configs, manifest.json and repositories last), the
OCI one (blobs/sha256/<diff id>, index.json, oci-layout) and a containerd-store
one whose layer blobs are gzip'd and named by their compressed digest.
"""
import gzip
import hashlib
import io
import json
import tarfile

import pytest

import edd


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(text):
    """A small layer: one file holding `text`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("www/index.html")
        data = text.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def config_for(layers):
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "config": {"Cmd": ["/bin/sh"]},
                       "rootfs": {"type": "layers",
                                  "diff_ids": [sha(layer) for layer in layers]}}).encode()


def build(members, fmt=tarfile.USTAR_FORMAT):
    """A tar of `members`: (name, bytes) files, or (name, TarInfo-settings dict)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, value in members:
            info = tarfile.TarInfo(name)
            if isinstance(value, dict):
                for key, setting in value.items():
                    setattr(info, key, setting)
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return out.getvalue()


def legacy_archive(tags=("website:latest",)):
    """docker save's legacy layout: two layers, the second shared by symlink."""
    base, top = layer_tar("base"), layer_tar("top")
    config = config_for([base, top])
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": list(tags),
                 "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]
    repositories = {tag.split(":")[0]: {tag.split(":")[1]: "bbb"} for tag in tags}
    archive = build([
        ("aaa/", {"type": tarfile.DIRTYPE}), ("aaa/VERSION", b"1.0"),
        ("aaa/json", b"{}"), ("aaa/layer.tar", base),
        ("bbb/", {"type": tarfile.DIRTYPE}), ("bbb/VERSION", b"1.0"),
        ("bbb/json", b"{}"), ("bbb/layer.tar", top),
        (config_name, config),
        ("manifest.json", json.dumps(manifest).encode()),
        ("repositories", json.dumps(repositories).encode()),
    ])
    return archive, config, [base, top]


def oci_archive(compressed=False):
    """The OCI layout; `compressed` names gzip'd layer blobs by their own digest,
    as a containerd-store engine does, so no file name is a diff ID."""
    base, top = layer_tar("oci base"), layer_tar("oci top")
    config = config_for([base, top])
    blobs = [gzip.compress(layer, mtime=0) if compressed else layer for layer in (base, top)]
    paths = ["blobs/sha256/" + sha(blob)[7:] for blob in blobs]
    config_path = "blobs/sha256/" + sha(config)[7:]
    image_manifest = json.dumps({"schemaVersion": 2, "config": {"digest": sha(config)},
                                 "layers": [{"digest": sha(b)} for b in blobs]}).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "digest": sha(image_manifest), "annotations": {
            "io.containerd.image.name": "docker.io/library/app:v2",
            "org.opencontainers.image.ref.name": "v2", "keep.me": "yes"}}]}
    manifest = [{"Config": config_path, "RepoTags": ["app:v2"], "Layers": paths}]
    archive = build(
        [("blobs/", {"type": tarfile.DIRTYPE}), ("blobs/sha256/", {"type": tarfile.DIRTYPE})]
        + list(zip(paths, blobs))
        + [(config_path, config), ("blobs/sha256/" + sha(image_manifest)[7:], image_manifest),
           ("index.json", json.dumps(index).encode()),
           ("manifest.json", json.dumps(manifest).encode()),
           ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')])
    return archive, config, [base, top], blobs


def run_filter(data, chunk=1 << 20, **options):
    archive = edd.Archive()
    pieces = edd.filter_archive((data[i:i + chunk] for i in range(0, len(data), chunk)),
                                archive, **options)
    return b"".join(bytes(p) for p in pieces), archive


def members_of(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.rstrip("/"): (tar.extractfile(m).read() if m.isfile() else m.type)
                for m in tar.getmembers()}


# -- the three layouts ----------------------------------------------------

def test_legacy_layout_passes_through_without_names():
    data, config, layers = legacy_archive(("website:latest", "edd/other:previous"))
    out, archive = run_filter(data)
    before, after = members_of(data), members_of(out)
    assert set(before) == set(after)
    for name, value in before.items():
        if name not in edd.METADATA_FILES:
            assert after[name] == value, name
    manifest = json.loads(after["manifest.json"])
    assert "RepoTags" not in manifest[0] and manifest[0]["Layers"] == ["aaa/layer.tar",
                                                                       "bbb/layer.tar"]
    assert json.loads(after["repositories"]) == {}
    # What the archive said is kept, for ?image= and the answer.
    assert edd.archive_names(archive) == ["website:latest", "edd/other:previous"]
    entry, = edd.read_manifest(archive)
    assert entry["RepoTags"] == ["website:latest", "edd/other:previous"]
    assert edd.config_id(archive, entry) == sha(config)
    assert archive.members["aaa/layer.tar"].digests == {sha(layers[0])}
    assert {sha(layer) for layer in layers} <= archive.digests()


def test_oci_layout_drops_name_annotations():
    data, config, layers, _ = oci_archive()
    out, archive = run_filter(data)
    after = members_of(out)
    index = json.loads(after["index.json"])
    assert index["manifests"][0]["annotations"] == {"keep.me": "yes"}
    assert "RepoTags" not in json.loads(after["manifest.json"])[0]
    assert after["oci-layout"] == b'{"imageLayoutVersion": "1.0.0"}'
    assert edd.archive_names(archive) == ["app:v2", "docker.io/library/app:v2"]
    entry, = edd.read_manifest(archive)
    assert edd.config_id(archive, entry) == sha(config)
    assert {sha(layer) for layer in layers} <= archive.digests()


def test_containerd_archive_maps_layers_by_manifest_not_file_name():
    data, config, layers, blobs = oci_archive(compressed=True)
    out, archive = run_filter(data)
    entry, = edd.read_manifest(archive)
    mapping = edd.layer_diff_ids(entry, config)
    assert [diff_id for _, diff_id in mapping] == [sha(layer) for layer in layers]
    assert [path for path, _ in mapping] == entry["Layers"]
    for (path, diff_id), blob in zip(mapping, blobs):
        member = archive.members[path]
        assert path.endswith(sha(blob)[7:]) and diff_id != sha(blob)
        # Both what the blob is and what docker's diff ID is, once gunzipped.
        assert member.digests == {sha(blob), diff_id}
        assert member.sha256 == sha(blob)


def test_layer_diff_ids_refuses_a_config_that_does_not_match():
    data, config, _ = legacy_archive()
    _, archive = run_filter(data)
    entry, = edd.read_manifest(archive)
    with pytest.raises(edd.BadRequest):
        edd.layer_diff_ids(dict(entry, Layers=entry["Layers"][:1]), config)
    with pytest.raises(edd.BadRequest):
        edd.layer_diff_ids(entry, b"{}")


# -- dropping layers, reading a spooled archive (the client's part) ---------

def test_drop_leaves_members_out_and_read_member_finds_them(tmp_path):
    data, config, layers = legacy_archive()
    spooled = tmp_path / "saved.tar"
    spooled.write_bytes(data)
    with open(str(spooled), "rb") as file:
        archive = edd.Archive()
        out = b"".join(bytes(p) for p in edd.filter_archive(
            iter(lambda: file.read(1000), b""), archive, drop={"aaa/layer.tar"}, strip=False))
        entry, = edd.read_manifest(archive)
        config_member = edd.resolve_member(archive, entry["Config"])
        assert edd.read_member(file, config_member) == config
        assert edd.read_member(file, archive.members["bbb/layer.tar"]) == layers[1]
    after = members_of(out)
    assert "aaa/layer.tar" not in after and after["bbb/layer.tar"] == layers[1]
    # strip=False passes the names on: a client filter changes nothing but layers.
    assert json.loads(after["manifest.json"])[0]["RepoTags"] == ["website:latest"]


def test_resolve_member_follows_links():
    layer = layer_tar("shared")
    data = build([("a/layer.tar", layer),
                  ("b/layer.tar", {"type": tarfile.SYMTYPE, "linkname": "../a/layer.tar"}),
                  ("c", {"type": tarfile.LNKTYPE, "linkname": "b/layer.tar"})])
    _, archive = run_filter(data)
    assert edd.resolve_member(archive, "b/layer.tar").name == "a/layer.tar"
    assert edd.resolve_member(archive, "./c").digests == {sha(layer)}
    assert edd.resolve_member(archive, "missing") is None


# -- streaming ------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 511, 513, 4096])
def test_any_chunking_gives_the_same_stream(chunk):
    data = oci_archive(compressed=True)[0]
    whole, archive = run_filter(data)
    pieces, small = run_filter(data, chunk=chunk)
    assert pieces == whole
    assert {n: (m.offset, m.digests) for n, m in small.members.items()} == \
        {n: (m.offset, m.digests) for n, m in archive.members.items()}
    for member in small.members.values():
        if member.sha256 and member.name not in edd.METADATA_FILES:
            assert sha(data[member.offset:member.offset + member.size]) == member.sha256


def test_big_members_pass_as_views_of_the_input():
    big = b"x" * (3 << 20)
    data = build([("big", big), ("manifest.json", b"[]")])
    tar = edd.ArchiveFilter(edd.Archive())
    pieces = tar.feed(data)
    assert any(isinstance(p, memoryview) and len(p) >= 1 << 20 for p in pieces)


def test_bytes_after_the_end_marker_are_not_passed_on():
    data = build([("a", b"a")]) + b"garbage that docker would choke on" * 20
    out, archive = run_filter(data)
    assert members_of(out) == {"a": b"a"} and list(archive.members) == ["a"]
    assert out.endswith(b"\0" * 1024)


def test_long_names_and_prefixes_are_read_like_go():
    long_dir = "d" * 120
    _, gnu = run_filter(build([(long_dir + "/manifest.json", b"[1]"), ("x" * 150, b"gnu")],
                              fmt=tarfile.GNU_FORMAT))
    assert set(gnu.members) == {long_dir + "/manifest.json", "x" * 150}
    _, pax = run_filter(build([("y" * 150, b"pax")], fmt=tarfile.PAX_FORMAT))
    assert set(pax.members) == {"y" * 150}
    _, ustar = run_filter(build([("p" * 90 + "/" + "q" * 90, b"ustar prefix")]))
    assert set(ustar.members) == {"p" * 90 + "/" + "q" * 90}


# -- names hidden in headers still get removed -----------------------------

@pytest.mark.parametrize("fmt, name", [
    (tarfile.PAX_FORMAT, "./manifest.json"),
    (tarfile.PAX_FORMAT, "/manifest.json"),
    (tarfile.GNU_FORMAT, "x/../manifest.json"),
])
def test_metadata_is_caught_under_any_spelling(fmt, name):
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["nginx:latest"],
                            "Layers": []}]).encode()
    data = build([("c.json", b"{}"), (name, manifest)], fmt=fmt)
    out, archive = run_filter(data)
    assert edd.archive_names(archive) == ["nginx:latest"]
    assert "RepoTags" not in json.loads(members_of(out)["manifest.json"])[0]


def test_a_pax_path_renames_a_member_into_manifest_json():
    manifest = json.dumps([{"Config": "c", "RepoTags": ["nginx:latest"], "Layers": []}])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("innocent.json")
        info.pax_headers = {"path": "manifest.json"}
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest.encode()))
    filtered, archive = run_filter(out.getvalue())
    assert edd.archive_names(archive) == ["nginx:latest"]
    assert b"nginx" not in filtered


# -- refusals -------------------------------------------------------------

@pytest.mark.parametrize("members, message", [
    ([("manifest.json", {"type": tarfile.SYMTYPE, "linkname": "tags.json"})],
     "one regular file"),
    ([("manifest.json", b"[]"), ("./manifest.json", b"[]")], "one regular file"),
    ([("d", {"type": tarfile.SYMTYPE, "linkname": "."}), ("d/manifest.json", b"[]")],
     "through a symbolic link"),
    ([("../escape", b"x")], "outside its root"),
    ([("manifest.json", b" " * (edd.MAX_METADATA_BYTES + 1))], "larger than 4 MiB"),
])
def test_crafted_archives_are_refused(members, message):
    with pytest.raises(edd.BadRequest, match=message):
        run_filter(build(members))


def test_not_a_tar_is_refused():
    with pytest.raises(edd.BadRequest, match="not a tar archive"):
        run_filter(b"{\"hello\": 1}" * 100)


def test_cut_short_and_empty_are_refused():
    data = build([("a", b"a" * 2000)])
    with pytest.raises(edd.BadRequest, match="cut short"):
        run_filter(data[:1200])
    with pytest.raises(edd.BadRequest, match="empty"):
        run_filter(b"")


@pytest.mark.parametrize("manifest", [b"not json", b"[]", b'[{"Config": 1}]',
                                      b'[{"Config": "c", "Layers": "l"}]'])
def test_malformed_manifest_is_refused(manifest):
    archive = edd.Archive(metadata={"manifest.json": manifest})
    with pytest.raises(edd.BadRequest, match="manifest.json"):
        edd.read_manifest(archive)


def test_an_archive_without_manifest_is_refused():
    with pytest.raises(edd.BadRequest, match="no manifest.json"):
        edd.read_manifest(edd.Archive())


def test_metadata_that_is_not_json_is_refused_at_close():
    with pytest.raises(edd.BadRequest, match="not valid JSON"):
        run_filter(build([("repositories", b"{oops")]))


# -- gzip ------------------------------------------------------------------

def test_gunzip_chunks():
    data = legacy_archive()[0]
    packed = gzip.compress(data)
    assert b"".join(edd.gunzip_chunks([packed[i:i + 1000] for i in range(0, len(packed), 1000)])) \
        == data
    halves = gzip.compress(data[:5000]) + gzip.compress(data[5000:])    # pigz -i, cat a.gz b.gz
    assert b"".join(edd.gunzip_chunks([halves])) == data
    assert b"".join(edd.gunzip_chunks([data[:1], data[1:]])) == data
    with pytest.raises(edd.BadRequest, match="cut short"):
        b"".join(edd.gunzip_chunks([packed[:len(packed) // 2]]))
    with pytest.raises(edd.BadRequest, match="corrupt"):
        b"".join(edd.gunzip_chunks([packed[:20] + b"\xff" * 200 + packed[220:]]))


def test_tar_member_is_read_by_tarfile():
    assert members_of(edd.tar_member("manifest.json", b"[]") + b"\0" * 1024) == \
        {"manifest.json": b"[]"}


# -- which layers an upload borrowed ----------------------------------------

def test_borrowed_layers_need_the_whole_chain():
    image = ["sha256:a", "sha256:b", "sha256:c"]
    assert edd.borrowed_layers(image, {"sha256:a", "sha256:b", "sha256:c"}, []) == []
    assert edd.borrowed_layers(image, {"sha256:c"}, []) == [0, 1]
    assert edd.borrowed_layers(image, {"sha256:c"}, [["sha256:a", "sha256:b"]]) == []
    # The same layer under another base is another chain: not this deployment's.
    assert edd.borrowed_layers(image, {"sha256:a", "sha256:c"}, [["sha256:x", "sha256:b"]]) \
        == [1]
    assert edd.borrowed_layers(image, {"sha256:c"}, [["sha256:a"], ["sha256:a", "sha256:x"]]) \
        == [1]


def test_numbers_are_read_like_go():
    # Go trims spaces and NULs at both ends of an octal field: a size field that
    # starts with a NUL still counts, or the walker would lose step with docker.
    assert edd._tar_number(b"\x00000000001000") == 512
    assert edd._tar_number(b" 777 \x00") == 0o777
    assert edd._tar_number(b"\x00" * 12) == 0
    assert edd._tar_number(b"\x80" + b"\x00" * 10 + b"\x05") == 5
    with pytest.raises(edd.BadRequest):
        edd._tar_number(b"1 2\x00")


# -- which image an upload deploys -------------------------------------------

def test_choose_image_by_the_names_the_archive_had():
    data, config, _ = legacy_archive(("website:latest", "website:v2"))
    _, archive = run_filter(data)
    assert edd.choose_image(archive, [sha(config)]) == sha(config)
    assert edd.choose_image(archive, [sha(config)], "website:v2") == sha(config)
    assert edd.choose_image(archive, [sha(config)], "website") == sha(config)
    with pytest.raises(edd.BadRequest, match="holds website:latest, website:v2, not nginx"):
        edd.choose_image(archive, [sha(config)], "nginx")
    # One image that docker reports under another ID (the containerd store's
    # manifest digest) is still that image; several are not guessed at.
    assert edd.choose_image(archive, ["sha256:manifest"]) == "sha256:manifest"
    with pytest.raises(edd.DockerError):
        edd.choose_image(archive, ["sha256:one", "sha256:two"])
