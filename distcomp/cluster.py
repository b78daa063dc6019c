"""``distcomp up`` / ``down``: start and stop workers on many hosts over SSH.

Why the system ``ssh`` in BatchMode rather than a Python SSH library
(asyncssh, paramiko): it already knows the user's keys, agent, ``~/.ssh/config``
(aliases, ProxyJump through a login node, ControlMaster), known_hosts and
Kerberos — everything a cluster's users have set up and would otherwise have to
configure twice. BatchMode makes it fail instead of prompting, so a host that
needs a password is an error in the table rather than a hung command.
Parallelism is a thread per host around ``subprocess.run``, which is enough for
the hundred-odd hosts a lab has and adds no dependency.

On each host a small POSIX ``sh`` script (sent on ssh's stdin, so neither the
script nor the Redis password ever appears on a command line or in ``ps``):

* checks the Python and that it can import distcomp;
* for every worker name, skips it if a pidfile names a live distcomp process
  on this host (``up`` is idempotent: running it again starts only what is
  missing, e.g. a host added to the file);
* starts ``PYTHON -m distcomp worker --name NAME`` under ``setsid nohup`` with
  stdin/stdout/stderr redirected, so it survives the SSH session and SSH does
  not wait for it; its log is ``DIR/up/NAME.log`` on the host;
* reports one line per worker, which ``up`` turns into the table.

``up`` then waits until every started worker has registered in Redis, so
"started" in the table means "reachable and taking work", not just "a process
existed for a moment".
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from .config import mask_text, url_password
from .hostfile import Host

RECORD_NAME = "cluster.json"
DEFAULT_REMOTE_DIR = "~/.distcomp"


class ClusterError(RuntimeError):
    """``up``/``down`` cannot proceed at all (no ssh, no reachable Redis...)."""


@dataclass
class UpOptions:
    """What ``distcomp up`` starts on every host (a host file line may override)."""

    redis_url: str
    queue: str = "default"
    python: str = "python3"
    workers_per_host: int = 1
    memory: str | None = None
    cpus: int | None = None
    gpus: str | None = None
    #: Where pidfiles, worker logs and task logs live on each host (``~`` = the host's home).
    remote_dir: str = DEFAULT_REMOTE_DIR
    #: Working directory of the workers (and so of tasks without ``cwd``); None = home.
    cwd: str | None = None
    #: Extra ``-o`` options for ssh (``IdentityFile=...``, ``StrictHostKeyChecking=no``).
    ssh_options: list[str] = field(default_factory=list)
    connect_timeout: int = 10
    #: Extra arguments for ``distcomp worker`` (``--heartbeat 2s``, ``--log-dir ...``).
    worker_args: list[str] = field(default_factory=list)
    #: How long to wait for started workers to register in Redis.
    register_timeout: float = 30.0


@dataclass
class HostResult:
    host: Host
    ok: bool
    status: str
    workers: list[str] = field(default_factory=list)
    detail: str = ""
    version: str = ""
    pids: dict[str, int] = field(default_factory=dict)


# -- ssh -----------------------------------------------------------------------

def ssh_command(host: Host, ssh_options: Sequence[str], connect_timeout: int) -> list[str]:
    """``ssh`` that never prompts, runs ``sh -s`` remotely and reads the script from stdin."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise ClusterError("no ssh client found: install OpenSSH (apt-get install "
                           "openssh-client)")
    cmd = [ssh, "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}",
           "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
    for option in ssh_options:
        cmd += ["-o", option]
    if host.port:
        cmd += ["-p", str(host.port)]
    if host.user:
        cmd += ["-l", host.user]
    return [*cmd, "--", host.host, "sh -s"]


def run_remote(host: Host, script: str, ssh_options: Sequence[str], connect_timeout: int,
               timeout: float) -> tuple[int, str, str]:
    """Run ``script`` on ``host``; (exit status, stdout, stderr). 255 = ssh itself failed."""
    cmd = ssh_command(host, ssh_options, connect_timeout)
    try:
        proc = subprocess.run(cmd, input=script, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, "", f"no answer from {host.label} within {timeout:.0f}s"
    return proc.returncode, proc.stdout, proc.stderr


def _ssh_problem(stderr: str, rc: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()
             and not ln.startswith("Warning: Permanently added")]
    text = lines[-1] if lines else f"ssh exited with status {rc}"
    if "Permission denied" in text:
        text += " (BatchMode: set up key-based login, e.g. ssh-copy-id, or --ssh-option " \
                "IdentityFile=KEY)"
    return text


# -- the scripts ---------------------------------------------------------------

_COMMON = r"""
set -u
case "$DIR" in "~") DIR=$HOME ;; "~/"*) DIR=$HOME/${DIR#"~/"} ;; /*) ;; *) DIR=$HOME/$DIR ;; esac
HOSTNAME_=$(hostname 2>/dev/null || uname -n)
BASE=${BASE:-$HOSTNAME_}
names() {
  if [ "$COUNT" -le 1 ]; then echo "$BASE"; return; fi
  i=1
  while [ "$i" -le "$COUNT" ]; do echo "$BASE-$i"; i=$((i + 1)); done
}
# A pidfile holds "PID HOSTNAME": on a shared file system another host's pid means nothing here.
alive() {
  [ -r "$1" ] || return 1
  read -r pid host < "$1" || return 1
  [ "$host" = "$HOSTNAME_" ] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q distcomp
}
"""

_UP = r"""
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "ERROR python not found on this host: $PY (give --python or python= in the host file)"
  exit 3
fi
if ! VER=$("$PY" -c 'import distcomp; print(distcomp.__version__)' 2>&1); then
  echo "ERROR $PY cannot import distcomp: $(echo "$VER" | tail -n 1)" \
    "(install it there: $PY -m pip install distcomp, or give the venv's python)"
  exit 3
fi
echo "VERSION $VER"
mkdir -p "$DIR/up" || { echo "ERROR cannot create $DIR/up"; exit 3; }
if [ -n "$WCWD" ]; then
  case "$WCWD" in "~") WCWD=$HOME ;; "~/"*) WCWD=$HOME/${WCWD#"~/"} ;; /*) ;;
    *) WCWD=$HOME/$WCWD ;; esac
  [ -d "$WCWD" ] || { echo "ERROR working directory $WCWD does not exist here"; exit 3; }
else
  WCWD=$HOME
fi
SETSID=$(command -v setsid || true)
STARTED=""
for name in $(names); do
  pidfile="$DIR/up/$name.pid"
  if alive "$pidfile"; then
    echo "RUNNING $name $pid"
    continue
  fi
  log="$DIR/up/$name.log"
  (
    cd "$WCWD" || exit 1
    # Redirect all three: ssh waits for every descriptor of its session to close.
    exec $SETSID nohup "$PY" -m distcomp --queue "$QUEUE" --state-dir "$DIR" worker \
      --name "$name" "$@"
  ) >> "$log" 2>&1 < /dev/null &
  echo "$! $HOSTNAME_" > "$pidfile"
  STARTED="$STARTED $name"
done
[ -z "$STARTED" ] && exit 0
sleep 1
for name in $STARTED; do
  if alive "$DIR/up/$name.pid"; then
    echo "STARTED $name $pid"
  else
    echo "FAILED $name exited at once: $(tail -n 3 "$DIR/up/$name.log" | tr '\n' ' ')"
  fi
done
"""

_DOWN = r"""
SIGNAL=TERM
[ "$DRAIN" = 1 ] && SIGNAL=USR1
WAITING=""
for pidfile in "$DIR/up/$BASE.pid" "$DIR/up/$BASE"-*.pid; do
  [ -e "$pidfile" ] || continue
  name=$(basename "$pidfile" .pid)
  case "$name" in "$BASE"|"$BASE"-[0-9]*) ;; *) continue ;; esac
  if ! alive "$pidfile"; then
    echo "NOTRUNNING $name"
    rm -f "$pidfile"
    continue
  fi
  if [ "$SIGNAL" = USR1 ]; then
    # Refuse rather than kill: an unhandled SIGUSR1 terminates the process and
    # orphans its tasks. Bit 9 of SigCgt is SIGUSR1 (signal 10).
    mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
    low=${mask#"${mask%????}"}
    if [ -z "$low" ] || [ $(( (0x$low >> 9) & 1 )) -ne 1 ]; then
      echo "FAILED $name this worker does not handle SIGUSR1 (drain);" \
        "upgrade distcomp on the host, or run down without --drain"
      continue
    fi
  fi
  kill -s "$SIGNAL" "$pid" 2>/dev/null
  WAITING="$WAITING $name:$pid"
done
[ -z "$WAITING" ] && exit 0
deadline=$(( $(date +%s) + WAIT ))
while :; do
  left=""
  for item in $WAITING; do
    pid=${item#*:}
    if kill -0 "$pid" 2>/dev/null; then left="$left $item"; else
      echo "STOPPED ${item%%:*}"; rm -f "$DIR/up/${item%%:*}.pid"; fi
  done
  WAITING=$left
  [ -z "$WAITING" ] && exit 0
  [ "$(date +%s)" -ge "$deadline" ] && break
  sleep 0.2
done
for item in $WAITING; do
  if [ "$DRAIN" = 1 ]; then echo "DRAINING ${item%%:*} ${item#*:}"; else
    echo "STILL ${item%%:*} ${item#*:}"; fi
done
"""


def _assign(name: str, value: str) -> str:
    return f"{name}={shlex.quote(value)}\n"


def up_script(host: Host, options: UpOptions) -> str:
    """The script ``up`` runs on ``host`` (holds the Redis URL: send it on stdin only)."""
    args: list[str] = []
    memory = host.memory or options.memory
    cpus = host.cpus or options.cpus
    gpus = host.gpus or options.gpus
    if memory:
        args += ["--memory", memory]
    if cpus:
        args += ["--cpus", str(cpus)]
    if gpus:
        args += ["--gpus", gpus]
    args += options.worker_args
    head = "".join([
        _assign("DIR", options.remote_dir),
        _assign("BASE", host.name or ""),
        _assign("COUNT", str(host.workers or options.workers_per_host)),
        _assign("PY", host.python or options.python),
        _assign("QUEUE", options.queue),
        _assign("WCWD", options.cwd or ""),
        _assign("DISTCOMP_REDIS", options.redis_url),
        "export DISTCOMP_REDIS\nunset DISTCOMP_QUEUE DISTCOMP_STATE_DIR\n",
        f"set -- {' '.join(shlex.quote(a) for a in args)}\n",
    ])
    return head + _COMMON + _UP


def down_script(host: Host, remote_dir: str, workers: int, *, drain: bool, wait: float) -> str:
    head = "".join([
        _assign("DIR", remote_dir),
        _assign("BASE", host.name or ""),
        _assign("COUNT", str(workers)),
        _assign("DRAIN", "1" if drain else "0"),
        _assign("WAIT", str(int(wait))),
    ])
    return head + _COMMON + _DOWN


def _parse_lines(stdout: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in stdout.splitlines():
        tag, _, rest = line.strip().partition(" ")
        if tag.isupper() and tag.isalpha():
            out.append((tag, rest))
    return out


# -- up ------------------------------------------------------------------------

def _up_one(host: Host, options: UpOptions) -> HostResult:
    secret = url_password(options.redis_url)
    rc, stdout, stderr = run_remote(host, up_script(host, options), options.ssh_options,
                                    options.connect_timeout, options.connect_timeout + 60)
    result = HostResult(host=host, ok=False, status="failed")
    started: list[str] = []
    problems: list[str] = []
    for tag, rest in _parse_lines(stdout):
        if tag == "VERSION":
            result.version = rest
        elif tag in ("STARTED", "RUNNING"):
            name, _, pid = rest.partition(" ")
            result.workers.append(name)
            if pid.isdigit():
                result.pids[name] = int(pid)
            if tag == "STARTED":
                started.append(name)
        elif tag in ("ERROR", "FAILED"):
            problems.append(rest)
    if rc == 255 or (rc != 0 and not problems):
        result.detail = mask_text(_ssh_problem(stderr, rc), secret)
        return result
    if problems:
        result.detail = mask_text("; ".join(problems), secret)
        result.status = "failed" if not result.workers else "partly started"
        return result
    result.ok = True
    result.status = "started" if started else "already running"
    if started and len(started) < len(result.workers):
        result.status = "started (some were running)"
    return result


def _await_registration(results: list[HostResult], options: UpOptions,
                        workers: Callable[[], list[dict[str, Any]]]) -> None:
    """Wait until each started worker shows up alive in Redis under its pid; a worker
    that never does is reported with the end of its log on the host."""
    pending = {(r.host.label, name): (r, pid) for r in results if r.ok
               for name, pid in r.pids.items()}
    deadline = time.monotonic() + options.register_timeout
    while pending:
        try:
            rows = {w.get("name"): w for w in workers()}
        except (redis.RedisError, OSError):  # a hiccup: keep waiting until the deadline
            rows = {}
        for key, (_result, pid) in list(pending.items()):
            row = rows.get(key[1])
            if row and row.get("status") == "alive" and str(row.get("pid")) == str(pid):
                del pending[key]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for (_label, name), (result, _pid) in pending.items():
        result.ok = False
        result.status = "failed"
        tail = _log_tail(result.host, name, options)
        result.detail = (f"worker {name} did not register with Redis within "
                         f"{options.register_timeout:.0f}s; its log on the host "
                         f"({options.remote_dir}/up/{name}.log) ends: {tail}")


def _log_tail(host: Host, name: str, options: UpOptions) -> str:
    script = (_assign("DIR", options.remote_dir) + _assign("COUNT", "1") + _COMMON
              + f'tail -n 3 "$DIR/up/{name}.log" 2>&1 | tr "\\n" " "\n')
    _rc, out, _err = run_remote(host, script, options.ssh_options, options.connect_timeout,
                                options.connect_timeout + 30)
    return mask_text(out.strip() or "(empty)", url_password(options.redis_url))


def up(hosts: Sequence[Host], options: UpOptions,
       workers: Callable[[], list[dict[str, Any]]] | None = None) -> list[HostResult]:
    """Start workers on every host in parallel; one result per host, in file order.

    ``workers`` lists the queue's workers (``Client.workers``); when given, ``up``
    waits for the started ones to register.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
        results = list(pool.map(lambda h: _up_one(h, options), hosts))
    if workers is not None:
        _await_registration(results, options, workers)
    return results


# -- down ----------------------------------------------------------------------

def _down_one(host: Host, remote_dir: str, workers: int, ssh_options: Sequence[str],
              connect_timeout: int, drain: bool, wait: float) -> HostResult:
    rc, stdout, stderr = run_remote(
        host, down_script(host, remote_dir, workers, drain=drain, wait=wait), ssh_options,
        connect_timeout, connect_timeout + wait + 60)
    result = HostResult(host=host, ok=False, status="failed")
    if rc != 0:
        result.detail = _ssh_problem(stderr, rc)
        return result
    stopped: list[str] = []
    still: list[str] = []
    draining: list[str] = []
    problems: list[str] = []
    for tag, rest in _parse_lines(stdout):
        name = rest.split(" ", 1)[0]
        if tag == "STOPPED":
            stopped.append(name)
        elif tag == "STILL":
            still.append(name)
        elif tag == "DRAINING":
            draining.append(name)
        elif tag == "FAILED":
            problems.append(rest)
    result.workers = stopped + draining + still
    if problems or still:
        result.detail = "; ".join(problems + [f"{n} still running after {wait:.0f}s" for n in
                                              still])
        return result
    result.ok = True
    if draining:
        result.status = "draining"
        result.detail = "finishing running tasks, then exiting"
    elif stopped:
        result.status = "stopped"
    else:
        result.status = "not running"
    return result


def down(hosts: Sequence[Host], *, remote_dir: str = DEFAULT_REMOTE_DIR,
         workers_per_host: int = 1, ssh_options: Sequence[str] = (), connect_timeout: int = 10,
         drain: bool = False, wait: float = 30.0) -> list[HostResult]:
    """Stop the workers ``up`` started: SIGTERM (running tasks go back to the queue) or,
    with ``drain``, SIGUSR1 (finish running tasks, then exit). Waits up to ``wait``
    seconds for them to exit."""
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
        return list(pool.map(
            lambda h: _down_one(h, remote_dir, h.workers or workers_per_host, ssh_options,
                                connect_timeout, drain, wait), hosts))


# -- what up started, so down needs no host file ---------------------------------

def record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_NAME


def load_record(state_dir: Path) -> dict[str, Any]:
    """``{"hosts": [...], "remote_dir": ..., "ssh_options": [...]}`` from earlier ``up``s."""
    try:
        data = json.loads(record_path(state_dir).read_text())
    except FileNotFoundError:
        return {"hosts": []}
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{record_path(state_dir)}: unreadable ({exc}); pass --hosts "
                           "FILE") from None
    return data if isinstance(data, dict) else {"hosts": []}


def save_record(state_dir: Path, data: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = record_path(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(record_path(state_dir))


def remember_up(state_dir: Path, results: Sequence[HostResult], options: UpOptions) -> None:
    """Add hosts where workers run to the record (merged with earlier ``up``s)."""
    data = load_record(state_dir)
    entries = {Host.from_dict(h).key: h for h in data.get("hosts", [])}
    for result in results:
        if result.workers:
            entry = result.host.to_dict()
            entry["workers"] = result.host.workers or options.workers_per_host
            entries[result.host.key] = entry
    data.update({"hosts": list(entries.values()), "remote_dir": options.remote_dir,
                 "ssh_options": list(options.ssh_options)})
    save_record(state_dir, data)


def forget_down(state_dir: Path, results: Sequence[HostResult]) -> None:
    """Drop hosts whose workers are gone from the record."""
    data = load_record(state_dir)
    gone = {r.host.key for r in results if r.ok and r.status in ("stopped", "not running")}
    data["hosts"] = [h for h in data.get("hosts", []) if Host.from_dict(h).key not in gone]
    save_record(state_dir, data)
