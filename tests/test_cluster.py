"""Many hosts for real: network namespaces as nodes, and `distcomp up`/`down` over sshd.

The namespace tests put Redis (our head-node server, bound to its address with
a password) in namespace `head`, a worker in each of `n1`..`n3`, and the
submitter in `sub`, all on a private bridge; the test process watches through
the head server's unix socket, which no network partition touches. They need
root and skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from conftest import run_cli, wait_for
from netns import Net, netns_unavailable

from distcomp.hostfile import HostFileError, parse_hosts
from distcomp.server import HeadSettings, head_paths, start_head, stop_head
from distcomp.store import Store

PASSWORD = "cluster-test-" + uuid.uuid4().hex[:12]
HEARTBEAT = ["--heartbeat", "0.5s", "--lease", "3s"]



def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for init to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTCOMP_")}
    env.update({"COLUMNS": "400", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


# -- host files (no root needed) ---------------------------------------------------

def test_host_file_parses_users_ports_and_settings() -> None:
    hosts = parse_hosts(
        "# workers\n"
        "node1\n"
        "alice@node2:2222   workers=2 memory=16G cpus=8  # big one\n"
        "[fe80::1]:22 gpus=0,1 python=/opt/venv/bin/python name=gpu\n", "hosts.txt")
    assert [h.label for h in hosts] == ["node1", "alice@node2:2222", "[fe80::1]:22"]
    assert (hosts[1].user, hosts[1].port, hosts[1].workers, hosts[1].memory, hosts[1].cpus) == (
        "alice", 2222, 2, "16G", 8)
    assert (hosts[2].host, hosts[2].gpus, hosts[2].python, hosts[2].name) == (
        "fe80::1", "0,1", "/opt/venv/bin/python", "gpu")


def test_host_file_errors_name_file_and_line() -> None:
    text = ("node1\n"
            "-oProxyCommand=evil\n"          # must never reach ssh as an option
            "node2 workers=zero\n"
            "node3 colour=blue\n"
            "node4 memory=lots\n"
            "node1\n")
    with pytest.raises(HostFileError) as info:
        parse_hosts(text, "hosts.txt")
    message = str(info.value)
    for line in (2, 3, 4, 5, 6):
        assert f"hosts.txt:{line}:" in message
    assert "hosts.txt:1:" not in message
    assert "unknown setting 'colour'" in message and "already listed on line 1" in message
    with pytest.raises(HostFileError, match="no hosts listed"):
        parse_hosts("# nothing\n\n", "empty.txt")


# -- network namespaces ------------------------------------------------------------

class Cluster:
    """Head (Redis), submitter and three worker hosts on one private bridge."""

    def __init__(self, net: Net, state: Path) -> None:
        self.net = net
        self.state = state
        self.head_ip = net.add("head", 1)
        net.add("sub", 2)
        for i in (1, 2, 3):
            net.add(f"n{i}", 10 + i)
        self.url = f"redis://:{PASSWORD}@{self.head_ip}:6379/0"
        started = subprocess.run(
            net.cmd("head", [sys.executable, "-m", "distcomp", "--state-dir", str(state),
                             "server", "start", "--bind", self.head_ip, "--port", "6379"]),
            env=_clean_env(DISTCOMP_SERVER_PASSWORD=PASSWORD), capture_output=True, text=True,
            timeout=60, check=False)
        assert started.returncode == 0, started.stderr
        assert PASSWORD not in started.stdout + started.stderr
        # The test watches over the server's private unix socket: no partition reaches it.
        self.watch_url = f"unix://:{PASSWORD}@{head_paths(state).socket}"
        self.workers: list[subprocess.Popen[str]] = []

    def store(self, queue: str) -> Store:
        return Store(self.watch_url, queue)

    def submit(self, queue: str, path: Path) -> None:
        proc = subprocess.run(
            self.net.cmd("sub", [sys.executable, "-m", "distcomp", "--queue", queue,
                                 "submit", str(path)]),
            env=_clean_env(DISTCOMP_REDIS=self.url), capture_output=True, text=True,
            timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr

    def worker(self, host: str, queue: str, tmp: Path,
               timing: Sequence[str] = HEARTBEAT) -> subprocess.Popen[str]:
        log = open(tmp / f"{host}.log", "a")  # noqa: SIM115 - lives as long as the worker
        proc = subprocess.Popen(
            self.net.cmd(host, [sys.executable, "-m", "distcomp", "--queue", queue,
                                "--state-dir", str(tmp / host), "worker", "--name", host,
                                "--cpus", "2", *timing]),
            env=_clean_env(DISTCOMP_REDIS=self.url), stdout=log, stderr=log, text=True)
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Net()
    try:
        yield Cluster(net, tmp_path_factory.mktemp("cluster-state"))
    finally:
        net.close()


@pytest.fixture
def queue(cluster: Cluster) -> Iterator[str]:
    yield "c" + uuid.uuid4().hex[:8]
    cluster.stop_workers()


def _succeeded_events(store: Store) -> Counter[str]:
    return Counter(e["task"] for e in store.events(10000) if e.get("type") == "succeeded")


def _assert_each_succeeded_once(store: Store, n_tasks: int) -> list[dict[str, str]]:
    rows = store.tasks([f"1.{i}" for i in range(1, n_tasks + 1)])
    assert [r["state"] for r in rows] == ["succeeded"] * n_tasks
    assert _succeeded_events(store) == Counter({r["id"]: 1 for r in rows})
    return rows


def test_workload_spreads_and_survives_node_loss(cluster: Cluster, queue: str,
                                                 tmp_path: Path) -> None:
    n = 24
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"shell:1:0:1:sleep 1; echo {i}\n" for i in range(n)))
    cluster.submit(queue, tasks)
    store = cluster.store(queue)
    for host in ("n1", "n2", "n3"):
        cluster.worker(host, queue, tmp_path)

    def running_on(name: str) -> list[str]:
        rows = store.tasks(store.running_task_ids(), fields=["state", "worker"])
        return [r["id"] for r in rows if r.get("worker") == name and r.get("state") == "running"]

    wait_for(lambda: store.counts().get("succeeded", 0) >= 4 and len(running_on("n3")) >= 1,
             timeout=30)
    cluster.net.kill_all("n3")  # node loss: the worker and its tasks die at once
    lost = running_on("n3")  # read after the kill: nothing can change them but a reaper
    assert lost
    wait_for(lambda: store.counts().get("succeeded", 0) == n, timeout=45, interval=0.1)

    rows = _assert_each_succeeded_once(store, n)
    by_task = {r["id"]: r for r in rows}
    ran_on = Counter(r["worker"] for r in rows)
    assert len(ran_on) >= 2, ran_on  # more than one host did the work
    assert set(ran_on) <= {"n1", "n2", "n3"}
    for tid in lost:  # requeued after the lease expired, and finished elsewhere
        assert by_task[tid]["worker"] in ("n1", "n2")
        assert int(by_task[tid]["attempt"]) >= 2
    reaped = {e["task"] for e in store.events(10000) if e.get("type") == "reaped"}
    assert set(lost) <= reaped
    store.close()


def test_partition_reruns_elsewhere_and_rejects_stale_reports(cluster: Cluster, queue: str,
                                                              tmp_path: Path) -> None:
    # A finishes during the partition (its report goes stale); B is still running on the
    # partitioned node when it comes back (its local copy must stop). Reruns are quick.
    # A link taken down is a black hole to an established TCP connection: n2's next Redis
    # call blocks until the link is back. n2 heartbeats every 3 s, so that call is A's
    # completion (A ends after 1.5 s), and it reaches Redis only after the heal, long after
    # A's lease (6 s) expired and A ran elsewhere: it must be refused as stale.
    tasks = tmp_path / "tasks.jsonl"
    first_long = 'if [ "$DISTCOMP_ATTEMPT" = 1 ]; then sleep {}; else sleep 0.2; fi; echo done'
    tasks.write_text("\n".join(json.dumps(t) for t in [
        {"cmd": first_long.format(1.5), "name": "A", "priority": 9},
        {"cmd": first_long.format(60), "name": "B", "priority": 8},
        *({"cmd": f"sleep 0.3; echo {i}", "priority": 0} for i in range(6)),
    ]) + "\n")
    cluster.submit(queue, tasks)
    store = cluster.store(queue)
    cluster.worker("n2", queue, tmp_path, ["--heartbeat", "3s", "--lease", "6s"])  # takes A, B
    wait_for(lambda: [r.get("worker") for r in store.tasks(["1.1", "1.2"])] == ["n2", "n2"],
             timeout=30)
    wait_for(lambda: bool(cluster.net.task_pids("n2", "1.2")), timeout=15)  # B runs on n2

    cluster.net.link("n2", up=False)  # partition
    cluster.worker("n1", queue, tmp_path)
    cluster.worker("n3", queue, tmp_path)

    def moved() -> bool:
        rows = store.tasks(["1.1", "1.2"])
        return all(r.get("worker") in ("n1", "n3") for r in rows)

    wait_for(moved, timeout=30, interval=0.1)  # lease expired, reaped, claimed elsewhere
    stale_before = store.counts().get("stale_reports", 0)
    cluster.net.link("n2", up=True)  # heal

    wait_for(lambda: store.counts().get("stale_reports", 0) > stale_before, timeout=30)
    stale = [e for e in store.events(10000) if e.get("type") == "stale"]
    assert "1.1" in {e["task"] for e in stale}  # A's late completion was refused
    wait_for(lambda: not cluster.net.task_pids("n2", "1.2"), timeout=30)  # B's copy stopped
    wait_for(lambda: store.counts().get("succeeded", 0) == 8, timeout=30, interval=0.1)
    rows = _assert_each_succeeded_once(store, 8)
    assert rows[0]["worker"] in ("n1", "n3") and rows[1]["worker"] in ("n1", "n3")
    assert store.counts().get("running", 0) == 0
    store.close()


# -- distcomp up / down against a real sshd -----------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_sshd() -> str | None:
    """Path of sshd, installing Debian's openssh-server if needed; None if impossible."""
    sshd = "/usr/sbin/sshd"
    if os.path.exists(sshd):
        return sshd
    if shutil.which("apt-get") is None:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], env=env,
                   capture_output=True, timeout=300, check=False)
    return sshd if os.path.exists(sshd) else None


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An sshd on a free loopback port, key-only auth, with a temporary key."""
    if os.geteuid() != 0:
        pytest.skip("the sshd test runs sshd as root (up/down over real SSH)")
    sshd_path = _ensure_sshd()
    if sshd_path is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server/openssh-client not installed and cannot be installed")
    directory = tmp_path_factory.mktemp("sshd")
    key, host_key = directory / "id_ed25519", directory / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                       check=True, capture_output=True)
    (directory / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}", "UsePAM no", "StrictModes no",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}", "LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([sshd_path, "-D", "-e", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, timeout=15, interval=0.05)
        yield port, key
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def head_server(tmp_path: Path) -> Iterator[str]:
    """A head-node server on loopback TCP with a password; yields its full URL."""
    state = tmp_path / "head-state"
    head, _ = start_head(state, HeadSettings(bind="127.0.0.1", port=_free_port(),
                                             password="up-down-" + uuid.uuid4().hex))
    try:
        yield head.url(show_password=True)
    finally:
        stop_head(state)


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Path]:
    """The workers' directory on the "remote" host; whatever `up` left running is
    stopped afterwards, even when the test failed."""
    directory = tmp_path / "remote"
    yield directory
    pids: list[int] = []
    for pidfile in (directory / "up").glob("*.pid"):
        pid = int(pidfile.read_text().split()[0])
        try:
            if b"distcomp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
        except (OSError, ValueError):
            continue
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=15)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _pid_catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_up_and_down_over_ssh(sshd: tuple[int, Path], head_server: str, remote: Path,
                              tmp_path: Path) -> None:
    port, key = sshd
    queue = "u" + uuid.uuid4().hex[:8]
    env = _clean_env(DISTCOMP_REDIS=head_server, DISTCOMP_QUEUE=queue,
                     DISTCOMP_STATE_DIR=str(tmp_path / "state"))
    ssh = ["--ssh-option", f"IdentityFile={key}", "--ssh-option", "IdentitiesOnly=yes",
           "--ssh-option", "StrictHostKeyChecking=no",
           "--ssh-option", "UserKnownHostsFile=/dev/null", "--ssh-option", "LogLevel=ERROR",
           "--connect-timeout", "5", "--remote-dir", str(remote)]
    python = ["--python", sys.executable]
    good = tmp_path / "good.txt"
    good.write_text(f"127.0.0.1:{port} name=alpha cpus=2\n"
                    f"root@localhost:{port} name=beta workers=2 cpus=1  # two workers\n")
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(good.read_text()
                     + f"127.0.0.1:{_free_port()} name=gone\n"            # nobody listens
                     + f"127.0.0.1:{port} name=nopy python=/nonexistent/python3\n")

    proc = run_cli(["up", "--hosts", str(hosts), *ssh, *python, "--json"], env)
    assert proc.returncode == 1, proc.stderr  # some hosts failed, the others started
    results = json.loads(proc.stdout)
    assert [r["ok"] for r in results] == [True, True, False, False], results
    assert results[0]["workers"] == ["alpha"] and results[0]["status"] == "started"
    assert results[1]["workers"] == ["beta-1", "beta-2"]
    assert "refused" in results[2]["detail"].lower()
    assert "python not found" in results[3]["detail"] and "/nonexistent/python3" in results[3][
        "detail"]
    password = head_server.split(":")[2].split("@")[0]
    assert password not in proc.stdout + proc.stderr

    listed = json.loads(run_cli(["workers", "--json"], env).stdout)
    alive = {w["name"] for w in listed if w["status"] == "alive"}
    assert alive == {"alpha", "beta-1", "beta-2"}
    pids = {w["name"]: int(w["pid"]) for w in listed}

    tasks = tmp_path / "t.txt"
    tasks.write_text("".join(f"shell:1:0:1:sleep 0.2; echo {i}\n" for i in range(12)))
    assert run_cli(["submit", str(tasks)], env).returncode == 0
    store = Store(head_server, queue)
    wait_for(lambda: store.counts().get("succeeded", 0) == 12, timeout=30, interval=0.1)
    ran_on = {r["worker"] for r in store.tasks([f"1.{i}" for i in range(1, 13)])}
    assert ran_on <= {"alpha", "beta-1", "beta-2"} and len(ran_on) >= 2
    assert (remote / "up" / "alpha.log").exists()

    again = run_cli(["up", "--hosts", str(good), *ssh, *python, "--json"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [r["status"] for r in json.loads(again.stdout)] == ["already running"] * 2
    listed = json.loads(run_cli(["workers", "--json"], env).stdout)
    assert {w["name"]: int(w["pid"]) for w in listed} == pids  # no second worker anywhere

    # down --drain: SIGUSR1 = finish running tasks, then exit.
    assert _pid_catches(pids["alpha"], signal.SIGUSR1)
    assert run_cli(["submit", "--", "sleep", "1.5"], env).returncode == 0
    wait_for(lambda: store.counts().get("running", 0) == 1, timeout=15)
    draining = run_cli(["down", "--hosts", str(good), *ssh, "--drain", "--json"], env)
    results = json.loads(draining.stdout)
    assert draining.returncode == 0 and {r["status"] for r in results} <= {
        "draining", "stopped"}
    wait_for(lambda: store.counts().get("succeeded", 0) == 13, timeout=30)
    assert store.counts().get("queued", 0) == 0

    # down (no host file: the hosts `up` recorded): SIGTERM, wait for exit.
    down = run_cli(["down", "--json", "--connect-timeout", "5"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert {r["status"] for r in json.loads(down.stdout)} <= {"stopped", "not running"}
    for pid in pids.values():
        wait_for(lambda pid=pid: not _alive(pid), timeout=10)  # type: ignore[misc]
    listed = json.loads(run_cli(["workers", "--json"], env).stdout)
    assert {w["status"] for w in listed} == {"stopped"}
    assert store.counts().get("running", 0) == 0
    store.close()


def test_up_refuses_without_reachable_redis(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node1\n")
    env = _clean_env(DISTCOMP_STATE_DIR=str(tmp_path / "state"),
                     XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    proc = run_cli(["up", "--hosts", str(hosts)], env, cwd=tmp_path)
    assert proc.returncode == 2 and "distcomp server start --bind" in proc.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("node1 workers=many\n")
    proc = run_cli(["up", "--hosts", str(bad)], env, cwd=tmp_path)
    assert proc.returncode == 2 and f"{bad}:1:" in proc.stderr

