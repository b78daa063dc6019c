"""The `distcomp` command end to end, as users type it, against real redis-servers."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, wait_for

from distcomp.store import Store

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "predecessor.txt"


def test_predecessor_example_runs_unchanged(cli_env: dict[str, str], store: Store,
                                            tmp_path: Path) -> None:
    # The example file as shipped, with its sleeps shortened for the test.
    text = EXAMPLE.read_text()
    for long, short in (("sleep 20", "sleep 0.4"), ("sleep 8", "sleep 0.3"),
                        ("sleep 4", "sleep 0.2"), ("sleep 2", "sleep 0.1")):
        text = text.replace(long, short)
    tasks = tmp_path / "task"
    tasks.write_text(text)
    proc = run_cli(["run", str(tasks), "--no-progress"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "7 tasks: 7 succeeded" in proc.stdout
    logs = run_cli(["logs", "1.1"], cli_env)
    assert logs.returncode == 0 and logs.stdout == (
        "this is the first param we can have more params\n")
    assert run_cli(["logs", "1.2"], cli_env).stdout == "a different param\n"
    assert run_cli(["logs", "1.3"], cli_env).stdout == "param1 param2\n"
    # running it again runs nothing twice
    again = run_cli(["run", str(tasks), "--no-progress"], cli_env)
    assert again.returncode == 0 and "7 tasks: 7 succeeded" in again.stdout
    assert store.counts()["succeeded"] == 7 and store.job_ids() == ["1"]


def test_thousand_true_tasks_on_two_slots(cli_env: dict[str, str], store: Store,
                                          tmp_path: Path) -> None:
    tasks = tmp_path / "many.txt"
    tasks.write_text("".join(f"shell:0:0:1:true {i}\n" for i in range(1000)))
    proc = run_cli(["run", str(tasks), "--cpus", "2", "--json"], cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"succeeded": 1000}
    counts = store.counts()
    assert counts["succeeded"] == 1000
    assert all(counts.get(s, 0) == 0 for s in ("queued", "running", "failed", "cancelled"))
    assert counts.get("stale_reports", 0) == 0


def test_failed_tasks_make_run_exit_1_with_reasons(cli_env: dict[str, str], tmp_path: Path
                                                   ) -> None:
    tasks = tmp_path / "t.txt"
    tasks.write_text("shell:1:0:1:true\nshell:1:0:1:exit 3\n")
    proc = run_cli(["run", str(tasks), "--no-progress"], cli_env)
    assert proc.returncode == 1
    assert "1 failed, 1 succeeded" in proc.stdout and "exit code 3" in proc.stdout
    retry = run_cli(["retry", "1"], cli_env)
    assert retry.returncode == 0 and "1 tasks requeued" in retry.stdout


def test_repeated_line_is_one_task_in_the_summary(cli_env: dict[str, str], store: Store,
                                                 tmp_path: Path) -> None:
    tasks = tmp_path / "t.txt"
    tasks.write_text("shell:1:0:1:echo a\nshell:1:0:1:echo b\nshell:1:0:1:echo a\n")
    proc = run_cli(["run", str(tasks), "--no-progress"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "2 tasks: 2 succeeded" in proc.stdout  # the repeat is the same task
    job = store.job("1")
    assert job is not None and job.n_tasks == 2


def test_bad_line_refuses_whole_file(cli_env: dict[str, str], store: Store, tmp_path: Path
                                     ) -> None:
    lines = [f"shell:1:1:1:echo {i}" for i in range(10_000)]
    lines[6_000] = "shell:1:lots:1:echo bad"
    tasks = tmp_path / "big.txt"
    tasks.write_text("\n".join(lines) + "\n")
    proc = run_cli(["submit", str(tasks)], cli_env)
    assert proc.returncode == 2
    assert f"{tasks}:6001" in proc.stderr and "'mem'" in proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert store.job_ids() == [] and store.counts() == {}
    run = run_cli(["run", str(tasks)], cli_env)
    assert run.returncode == 2 and store.counts() == {}


def test_submit_single_command_with_flags(cli_env: dict[str, str], store: Store) -> None:
    proc = run_cli(["submit", "--mem", "2G", "--cpus", "2", "--priority", "3", "--tag", "x",
                    "--env", "A=1", "--timeout", "5m", "--json", "--", "echo", "a b", "$HOME"],
                   cli_env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["new"] == 1
    task = store.task(out["tasks"][0])
    assert task is not None
    spec = json.loads(task["spec"])
    assert spec["cmd"] == "echo 'a b' '$HOME'"
    assert spec["mem"] == 2 * 1024**3 and spec["cpus"] == 2 and spec["priority"] == 3
    assert spec["timeout"] == 300 and spec["env"] == {"A": "1"} and spec["tags"] == ["x"]
    bad = run_cli(["submit", "--mem", "lots", "--", "true"], cli_env)
    assert bad.returncode == 2 and "mem" in bad.stderr


def test_listings_results_and_exit_codes(cli_env: dict[str, str], tmp_path: Path) -> None:
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"cmd": "echo hi", "name": "greet", "tags": ["a"]}\n'
                     '{"cmd": "exit 2", "tags": ["b"]}\n')
    assert run_cli(["run", str(tasks), "--no-progress"], cli_env).returncode == 1
    status = json.loads(run_cli(["status", "--json"], cli_env).stdout)
    assert status["counts"]["succeeded"] == 1 and status["counts"]["failed"] == 1
    rows = json.loads(run_cli(["tasks", "--tag", "a", "--json"], cli_env).stdout)
    assert [r["name"] for r in rows] == ["greet"]
    failed = json.loads(run_cli(["tasks", "--state", "failed", "--json"], cli_env).stdout)
    assert [r["id"] for r in failed] == ["1.2"]
    table = list(csv.DictReader(io.StringIO(run_cli(["results", "--format", "csv"],
                                                    cli_env).stdout)))
    assert [(r["id"], r["state"], r["exit_code"]) for r in table] == [
        ("1.1", "succeeded", "0"), ("1.2", "failed", "2")]
    assert all(r["host"] and r["wall"] for r in table)
    assert run_cli(["logs", "9.9"], cli_env).returncode == 4
    assert run_cli(["tasks", "--job", "42"], cli_env).returncode == 4
    workers = json.loads(run_cli(["workers", "--json"], cli_env).stdout)
    assert workers and workers[0]["status"] == "stopped"
    assert run_cli(["workers", "--prune"], cli_env).returncode == 0
    assert json.loads(run_cli(["workers", "--json"], cli_env).stdout) == []
    assert run_cli(["cancel", "1"], cli_env).stdout.strip() == "0 tasks cancelled"


def test_unreachable_redis_exit_code(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(cli_env, DISTCOMP_REDIS=f"unix://{tmp_path}/nothing.sock")
    proc = run_cli(["status"], env)
    assert proc.returncode == 3 and "cannot reach Redis" in proc.stderr


def test_embedded_default_server_lifecycle(tmp_path: Path) -> None:
    """No --redis: a private server starts in ./.distcomp, is reused, and persists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTCOMP_")}
    tasks = tmp_path / "t.txt"
    tasks.write_text("shell:1:0:1:echo one\nshell:1:0:1:echo two\n")
    try:
        proc = run_cli(["run", "t.txt", "--no-progress"], env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        sock = tmp_path / ".distcomp" / "redis.sock"
        assert sock.exists() and (tmp_path / ".distcomp" / "redis.conf").exists()
        status = run_cli(["server", "status"], env, cwd=tmp_path)
        assert status.returncode == 0 and "running" in status.stdout
        assert run_cli(["server", "stop"], env, cwd=tmp_path).stdout.strip() == "stopped"
        assert run_cli(["server", "status"], env, cwd=tmp_path).returncode == 3
        # the AOF brought everything back: nothing runs twice
        again = run_cli(["run", "t.txt", "--no-progress"], env, cwd=tmp_path)
        assert again.returncode == 0 and "2 tasks: 2 succeeded" in again.stdout
        assert run_cli(["logs", "1.2"], env, cwd=tmp_path).stdout == "two\n"
    finally:
        run_cli(["server", "stop"], env, cwd=tmp_path)


def test_ctrl_c_stops_run_and_a_second_run_continues(cli_env: dict[str, str], store: Store,
                                                    tmp_path: Path) -> None:
    tasks = tmp_path / "t.txt"
    tasks.write_text("".join(f"shell:1:0:1:sleep 0.3; echo {i}\n" for i in range(8)))
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "run", str(tasks), "--cpus", "2",
                             "--no-progress"], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: store.counts().get("succeeded", 0) >= 2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 1  # not everything finished
    counts = store.counts()
    assert counts.get("running", 0) == 0 and counts["queued"] >= 1
    done_before = counts["succeeded"]
    again = run_cli(["run", str(tasks), "--cpus", "2", "--no-progress"], cli_env)
    assert again.returncode == 0 and "8 tasks: 8 succeeded" in again.stdout
    assert store.counts()["succeeded"] == 8 and done_before < 8


@pytest.mark.parametrize("fmt", ["toml", "jsonl"])
def test_rich_formats_run(cli_env: dict[str, str], tmp_path: Path, fmt: str) -> None:
    if fmt == "toml":
        path = tmp_path / "t.toml"
        path.write_text('[defaults]\nmem = "100M"\n\n[[task]]\ncmd = "echo $X"\n'
                        'env = { X = "from-toml" }\n')
    else:
        path = tmp_path / "t.jsonl"
        path.write_text('{"cmd": "echo $X", "env": {"X": "from-toml"}, "mem": "100M"}\n')
    proc = run_cli(["run", str(path), "--no-progress"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert run_cli(["logs", "1.1"], cli_env).stdout == "from-toml\n"
