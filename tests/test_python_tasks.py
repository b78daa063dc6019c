"""Python tasks: the task-file syntax, and how a worker runs them (references,
pickles and their refusal, results inline or as files, crashes) on a real redis-server."""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import RedisProcess, WorkerThread

from distcomp import Client
from distcomp.executor import RemoteError, ResultUnavailableError, decode_outcome
from distcomp.pytask import SPLIT_MAGIC, load_call, pack_call
from distcomp.spec import FieldError, SpecError, TaskSpec
from distcomp.store import Store
from distcomp.taskfile import parse_jsonl, parse_lines, parse_python_call, parse_toml

cloudpickle.register_pickle_by_value(sys.modules[__name__])

StartWorker = Callable[..., WorkerThread]


def big_bytes(n: int) -> bytes:
    return b"x" * n


def unpicklable_result() -> object:
    return threading.Lock()


# ----------------------------------------------------------------- task-file syntax


def test_python_line_arguments() -> None:
    specs = parse_lines('python:3:2:1:pkg.mod:fn 1 2.5 true null [1,2] {"a":1} word '
                        '"two words" "7" \'{"b": 2}\' \'a b\' x=5 name=bob '
                        'opts={"k":[1]} who="Ann Lee"\n', "t.txt")
    (spec,) = specs
    assert spec.kind == "python" and spec.func == "pkg.mod:fn"
    assert spec.priority == 3 and spec.mem == 2 * 1024**3 and spec.cpus == 1
    assert spec.args == (1, 2.5, True, None, [1, 2], {"a": 1}, "word", "two words", "7",
                         {"b": 2}, "a b")
    assert dict(spec.kwargs) == {"x": 5, "name": "bob", "opts": {"k": [1]}, "who": "Ann Lee"}
    assert spec.cmd.startswith("python: pkg.mod:fn(1, 2.5, true, null, [1,2]")
    assert TaskSpec.from_json(spec.to_json()) == spec


def test_python_line_without_arguments_and_dotted_function() -> None:
    (spec,) = parse_lines("python:0:0:1:pkg.mod:Cls.method\n", "t.txt")
    assert spec.func == "pkg.mod:Cls.method" and spec.args == () and spec.kwargs == ()


@pytest.mark.parametrize("text, message", [
    ("pkg.mod 1 2", "cannot read function reference"),
    ("pkg.mod:fn x=1 2", "positional argument '2' after keyword"),
    ("pkg.mod:fn x=1 x=2", "given twice"),
    ("pkg.mod:fn 'unclosed", "no closing ' quote"),
    ("", "missing"),
])
def test_python_call_errors(text: str, message: str) -> None:
    with pytest.raises(FieldError, match=message):
        parse_python_call(text)


def test_bad_python_line_names_file_and_line() -> None:
    with pytest.raises(SpecError) as info:
        parse_lines("shell:0:0:1:true\npython:0:0:1:not-a-ref 1\n", "jobs.txt")
    assert "jobs.txt:2" in str(info.value) and "function reference" in str(info.value)


def test_unknown_type_lists_python() -> None:
    with pytest.raises(SpecError, match="'shell' or 'python'"):
        parse_lines("perl:0:0:1:x\n", "t.txt")


def test_func_args_kwargs_in_toml_and_jsonl() -> None:
    (toml_spec,) = parse_toml('[[task]]\nfunc = "pkg.mod:fn"\nargs = [1, "a"]\n'
                              'kwargs = {k = 2}\nmem = "1G"\n', "t.toml")
    (json_spec,) = parse_jsonl('{"func": "pkg.mod:fn", "args": [1, "a"], "kwargs": {"k": 2},'
                               ' "mem": "1G"}\n', "t.jsonl")
    for spec in (toml_spec, json_spec):
        assert spec.kind == "python" and spec.args == (1, "a") and dict(spec.kwargs) == {"k": 2}
    assert toml_spec.dedup_key() == json_spec.dedup_key()


def test_func_fields_refused_where_they_do_not_belong() -> None:
    with pytest.raises(SpecError, match="expected a list"):
        parse_jsonl('{"func": "m:f", "args": 3}\n', "t.jsonl")
    with pytest.raises(SpecError, match="python tasks"):
        parse_jsonl('{"cmd": "true", "type": "shell", "args": [1]}\n', "t.jsonl")
    with pytest.raises(SpecError, match="function reference"):
        parse_jsonl('{"type": "python", "cmd": "x"}\n', "t.jsonl")


# ----------------------------------------------------------------- running them


@pytest.fixture
def client(redis_server: RedisProcess, queue_name: str, tmp_path: Path) -> Iterator[Client]:
    c = Client(redis_server.url, queue_name, state_dir=tmp_path / "state")
    yield c
    c.close()


def test_reference_task_from_a_file(client: Client, start_worker: StartWorker,
                                    tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "experiments.py").write_text(
        "import os\n"
        "def run(a, b, scale=1):\n"
        "    return {'sum': (a + b) * scale, 'task': os.environ['DISTCOMP_TASK_ID']}\n")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("python:0:0:1:experiments:run 2 3 scale=10\n"
                     "python:0:0:1:experiments:missing\n"
                     "python:0:0:1:no_such_module:run\n")
    result = client.submit_file(tasks)
    # Pickles refused, yet references run: they carry no code.
    start_worker(max_tasks=3, allow_pickle=False, pythonpath=[str(code)]).join()
    job = client.job_handle(result.job_id or "")
    futures = job.futures()
    assert futures[0].result(timeout=10) == {"sum": 50, "task": futures[0].task_id}
    rows = [client.task(f.task_id) for f in futures]
    assert rows[1].state == "failed" and "raised AttributeError" in rows[1].reason
    assert rows[2].state == "failed" and "No module named 'no_such_module'" in rows[2].reason
    with pytest.raises(ModuleNotFoundError):
        futures[2].result(timeout=10)


def test_pickled_task_refused_without_allow_pickle(client: Client, start_worker: StartWorker
                                                  ) -> None:
    fut = client.submit(big_bytes, 3, retries=3)
    w = start_worker(max_tasks=1, allow_pickle=False)
    exc = fut.exception(timeout=30)
    w.join()
    assert isinstance(exc, RemoteError) and "refuses pickled Python tasks" in str(exc)
    raw = client.task_raw(fut.task_id)
    assert raw["state"] == "failed" and raw["fails"] == "1"  # not retried: no retry can help


def test_large_result_goes_to_a_file(client: Client, start_worker: StartWorker,
                                     tmp_path: Path) -> None:
    results = tmp_path / "results"
    small = client.submit(big_bytes, 100)
    large = client.submit(big_bytes, 20 * 1024 * 1024)
    w = start_worker(max_tasks=2, allow_pickle=True, result_dir=results)
    assert small.result(timeout=60) == b"x" * 100
    assert large.result(timeout=60) == b"x" * (20 * 1024 * 1024)
    w.join()
    raw_small, raw_large = client.task_raw(small.task_id), client.task_raw(large.task_id)
    assert raw_small["result"] and not raw_small["result_path"]
    assert not raw_large["result"] and raw_large["result_path"].startswith(str(results))
    assert int(raw_large["result_size"]) > 20 * 1024 * 1024
    # A client that cannot read the file gets a clear error, not a hang.
    Path(raw_large["result_path"]).unlink()
    ok, exc = decode_outcome(large.task_id, {k: raw_large.get(k) for k in
                                             ("state", "result", "result_path", "result_size",
                                              "reason", "host")})
    assert not ok and isinstance(exc, ResultUnavailableError)
    assert "--result-dir" in str(exc) and raw_large["result_path"] in str(exc)


def test_result_cap_is_configurable(client: Client, start_worker: StartWorker) -> None:
    fut = client.submit(big_bytes, 5000)
    start_worker(max_tasks=1, allow_pickle=True, result_max_bytes=1000).join()
    assert fut.result(timeout=30) == b"x" * 5000
    raw = client.task_raw(fut.task_id)
    assert raw["result"] == "" and raw["result_path"].endswith(".result")


def test_unpicklable_return_value_fails_clearly(client: Client, start_worker: StartWorker
                                                ) -> None:
    fut = client.submit(unpicklable_result)
    start_worker(max_tasks=1, allow_pickle=True).join()
    exc = fut.exception(timeout=30)
    assert isinstance(exc, TypeError) and "could not be pickled" in str(exc)


def test_timeout_applies_to_python_tasks(client: Client, start_worker: StartWorker) -> None:
    import time

    fut = client.submit(time.sleep, 30, timeout="0.5s")
    start_worker(max_tasks=1, allow_pickle=True, kill_grace=0.5).join()
    exc = fut.exception(timeout=30)
    assert isinstance(exc, RemoteError) and "timed out after 0.5s" in str(exc)


def test_call_and_result_files_are_cleaned_up(client: Client, start_worker: StartWorker,
                                              tmp_path: Path) -> None:
    fut = client.submit(big_bytes, 1)
    start_worker(max_tasks=1, allow_pickle=True).join()
    assert fut.result(timeout=30) == b"x"
    leftovers = [p.name for p in (tmp_path / "logs").rglob("*")
                 if p.suffix in (".call", ".result", ".status")]
    assert leftovers == []


def test_large_payload_is_stored_under_the_queue_prefix(client: Client, store: Store) -> None:
    data = b"z" * 20_000
    fut = client.submit(len, data)
    spec = json.loads(client.task_raw(fut.task_id)["spec"])
    assert spec["kind"] == "python" and spec["payload"].startswith(store.prefix + "payload:")
    (blob,) = store.get_payloads([spec["payload"]])
    assert blob is not None and blob.startswith(SPLIT_MAGIC)
    fn, args, kwargs = load_call(blob)
    assert fn is len and args == (data,) and kwargs == {}


def test_split_calls_reuse_the_unpickled_function() -> None:
    """A warm interpreter unpickles each distinct function once, not once per call."""
    function_pickle = cloudpickle.dumps(big_bytes)
    first, _, _ = load_call(pack_call(function_pickle, (1,), {}))
    again, args, kwargs = load_call(pack_call(function_pickle, (2,), {"x": 1}))
    assert again is first and args == (2,) and kwargs == {"x": 1}
    other, _, _ = load_call(pack_call(cloudpickle.dumps(len), (), {}))
    assert other is len
    # The older whole-call pickle still loads (payloads queued before an upgrade).
    fn, args, _ = load_call(cloudpickle.dumps((big_bytes, (5,), {})))
    assert fn(*args) == b"xxxxx"


def test_small_payload_travels_inside_the_spec(client: Client, store: Store,
                                                start_worker: StartWorker) -> None:
    fut = client.submit(big_bytes, 3)
    spec = json.loads(client.task_raw(fut.task_id)["spec"])
    assert spec["payload"].startswith("inline:")
    assert store.redis.keys(store.prefix + "payload:*") == []
    start_worker(max_tasks=1, allow_pickle=True).join()
    assert fut.result(timeout=30) == b"xxx"


def big_buffer(n: int) -> object:
    """What numpy arrays hand to pickle under protocol 5: a PickleBuffer (no len())."""
    import pickle

    return pickle.PickleBuffer(bytearray(b"y" * n))


@pytest.mark.parametrize("inline_max", [-1, 1 << 20, 1000])
def test_outcome_sink_takes_pickle_buffers(tmp_path: Path, inline_max: int) -> None:
    """A 200 KB protocol-5 buffer, in memory (the reply) or spilled to the result file."""
    from distcomp.pytask import execute

    result_path = tmp_path / "r.result"
    code, data = execute(cloudpickle.dumps((big_buffer, (200_000,), {})), str(result_path),
                         inline_max)
    assert code == 0
    if inline_max >= 200_000:
        assert data is not None and not result_path.exists()
    else:
        assert data is None
        data = result_path.read_bytes()
    ok, value = decode_outcome("1.1", {"state": "succeeded",
                                       "result": base64.b64encode(data).decode()})
    assert ok and bytes(value) == b"y" * 200_000
