"""Config validation: every mistake is refused with one line naming the file and key."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import edd

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tls_files(tmp_path):
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    return {"server_cert": "server.crt", "server_key": "server.key", "client_ca": "ca.crt"}


def write(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return str(path)


def test_defaults_and_relative_paths(tmp_path, tls_files):
    config = edd.load_config(write(tmp_path, dict(tls_files, deployments=[{"name": "web"}])))
    assert config.listen == ("0.0.0.0", 8866)
    assert config.server_cert == str(tmp_path / "server.crt")
    assert config.max_upload_bytes == 8 << 30
    web = config.deployments["web"]
    assert (web.args, web.clients, web.settle_seconds, web.health_timeout_seconds) == \
        ((), None, 2.0, 60.0)
    assert web.tag("current") == "edd/web:current"
    assert web.parked_container == "web.edd-old"


def test_full_deployment(tmp_path, tls_files):
    raw = dict(tls_files, listen="[::1]:9000", admins=["ops"], max_upload_bytes=10,
               deployments=[{"name": "my-app.v2", "args": ["-p", "80:80"], "command": ["x"],
                             "clients": ["ci"], "settle_seconds": 0,
                             "health_timeout_seconds": 5, "stop_timeout_seconds": 3}])
    config = edd.load_config(write(tmp_path, raw))
    assert config.listen == ("::1", 9000)
    assert config.admins == frozenset(["ops"])
    app = config.deployments["my-app.v2"]
    assert app.args == ("-p", "80:80") and app.command == ("x",)
    assert app.clients == frozenset(["ci"]) and app.settle_seconds == 0.0


@pytest.mark.parametrize("change, message", [
    ({"deployments": None}, "deployments: must be a list"),
    ({"deployments": "web"}, "deployments: must be a list"),
    ({"listen": "8866"}, "listen: must be HOST:PORT"),
    ({"listen": "host:99999"}, "listen: must be HOST:PORT"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"max_upload_bytes": 0}, "max_upload_bytes: must be greater than 0"),
    ({"max_upload_bytes": True}, "max_upload_bytes: must be an integer"),
    ({"admins": ["a", 1]}, "admins: must be a list of strings"),
    ({"server_cert": "missing.crt"}, "server_cert: cannot read"),
    ({"deployments": [{"name": "web"}, {"name": "web"}]},
     "deployments[1].name: 'web' appears twice"),
    ({"deployments": [{}]}, "deployments[0].name: missing"),
    ({"deployments": [{"name": "Web"}]}, "deployments[0].name: 'Web' must be"),
    ({"deployments": [{"name": "w"}]}, "deployments[0].name: 'w' must be"),
    ({"deployments": [{"name": "web-"}]}, "deployments[0].name: 'web-' must be"),
    ({"deployments": [{"name": "a..b"}]}, "deployments[0].name: 'a..b' must be"),
    ({"deployments": [{"name": "web", "args": "-p 80:80"}]},
     "deployments[0].args: must be a list"),
    ({"deployments": [{"name": "web", "args": ["--name=x"]}]},
     "deployments[0].args: '--name=x' is set by edd itself"),
    ({"deployments": [{"name": "web", "args": ["--rm"]}]},
     "deployments[0].args: '--rm' is set by edd itself"),
    ({"deployments": [{"name": "web", "settle_seconds": -1}]},
     "deployments[0].settle_seconds: must not be negative"),
    ({"deployments": [{"name": "web", "settle_seconds": "2"}]},
     "deployments[0].settle_seconds: must be a number"),
    ({"deployments": [{"name": "web", "port": 80}]}, "deployments[0].port: unknown key"),
    ({"deployments": ["web"]}, "deployments[0]: must be an object"),
])
def test_mistakes_name_file_and_key(tmp_path, tls_files, change, message):
    raw = dict(tls_files, deployments=[{"name": "web"}])
    raw.update(change)
    path = write(tmp_path, raw)
    with pytest.raises(edd.ConfigError) as caught:
        edd.load_config(path)
    assert str(caught.value).startswith(path + ": ")
    assert message in str(caught.value)


def test_not_json_or_not_an_object(tmp_path):
    with pytest.raises(edd.ConfigError, match="not valid JSON"):
        edd.load_config(write(tmp_path, "{"))
    with pytest.raises(edd.ConfigError, match="top level: must be an object"):
        edd.load_config(write(tmp_path, "[]"))
    with pytest.raises(edd.ConfigError, match="cannot read"):
        edd.load_config(str(tmp_path / "absent.json"))


def test_bad_tls_files_are_named(tmp_path, tls_files):
    config = edd.load_config(write(tmp_path, dict(tls_files, deployments=[])))
    with pytest.raises(edd.ConfigError, match="server_cert/server_key: cannot load"):
        edd.make_ssl_context(config)


def run_edd(*args):
    return subprocess.run([sys.executable, str(REPO / "edd.py")] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)


def test_command_line_prints_one_line_and_no_traceback(tmp_path, tls_files):
    path = write(tmp_path, dict(tls_files, deployments=[{"name": "web", "args": [1]}]))
    for args in (["--config", path], ["--check", "--config", path]):
        done = run_edd(*args)
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            "edd: error: %s: deployments[0].args: must be a list of strings" % path]


def test_version():
    done = run_edd("--version")
    assert done.returncode == 0 and done.stdout.strip() == "edd " + edd.__version__
