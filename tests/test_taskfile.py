"""Task file parsing: the old line format keeps working, bad files are refused whole."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distcomp.spec import (
    GIB,
    MIB,
    PRIORITY_MAX,
    PRIORITY_MIN,
    FieldError,
    SpecError,
    TaskSpec,
    parse_size,
)
from distcomp.taskfile import (
    KNOWN_FIELDS,
    parse_jsonl,
    parse_lines,
    parse_task_file,
    parse_toml,
    spec_from_fields,
)

PREDECESSOR_EXAMPLE = """\
shell:1:1:1:echo "this is the first param" "we can have more params"
shell:1:1:1:echo "a different param"
shell:1:1:1:echo param1 param2
shell:1:1:1:sleep 8
"""


def refused(parse: Any, text: str, source: str = "tasks.txt", **kw: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, source, **kw)
    return info.value


# --------------------------------------------------------------------------- line format


def test_predecessor_example_file_parses(tmp_path: Path) -> None:
    path = tmp_path / "tasks.txt"
    path.write_text(PREDECESSOR_EXAMPLE)
    specs = parse_task_file(path)
    assert [s.cmd for s in specs] == [
        'echo "this is the first param" "we can have more params"',
        'echo "a different param"',
        "echo param1 param2",
        "sleep 8",
    ]
    assert all((s.kind, s.priority, s.mem, s.cpus) == ("shell", 1, GIB, 1) for s in specs)
    assert [s.source for s in specs] == [f"{path}:{n}" for n in (1, 2, 3, 4)]


def test_cachesim_line_maps_columns() -> None:
    (spec,) = parse_lines("shell:4:2:2:./cachesim PARAM1 PARAM2", "t.txt")
    assert (spec.priority, spec.mem, spec.cpus, spec.cmd) == (
        4,
        2 * GIB,
        2,
        "./cachesim PARAM1 PARAM2",
    )
    assert spec.source == "t.txt:1"


def test_colons_comments_blank_lines_and_crlf() -> None:
    text = (
        "# header\r\n\r\n   \r\n  # indented comment\r\n"
        "shell:1:1:1:echo a:b:c\r\n shell:2:0.5:0: echo  x  \r\n"
    )
    specs = parse_lines(text, "t.txt")
    assert [(s.cmd, s.source) for s in specs] == [("echo a:b:c", "t.txt:5"), ("echo  x", "t.txt:6")]
    assert (specs[1].priority, specs[1].mem, specs[1].cpus) == (2, GIB // 2, 0)


def test_mem_accepts_units() -> None:
    (spec,) = parse_lines("shell:0:512M:1:true", "t.txt")
    assert spec.mem == 512 * MIB


def test_empty_line_file_gives_no_tasks() -> None:
    assert parse_lines("", "t.txt") == []
    assert parse_lines("# only a comment\n\n", "t.txt") == []


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("shell:high:1:1:true", "priority", "integer"),
        (f"shell:{PRIORITY_MAX + 1}:1:1:true", "priority", "between"),
        ("shell:1:lots:1:true", "mem", "size"),
        ("shell:1:-2:1:true", "mem", "size"),
        ("shell:1:1:-1:true", "cpus", "between 0"),
        ("shell:1:" + "9" * 400 + ":1:true", "mem", "cannot read size"),
        ("shell:" + "1" * 5000 + ":1:1:true", "priority", "integer"),
        ("shell:1:1:1.5:true", "cpus", "integer"),
        ("shell:1:1:1", None, "type:priority:min_dram_GB:min_cpu:command"),
        ("python:1:1:1:run.py", "func", "cannot read function reference"),
        ("perl:1:1:1:run.pl", "type", "unknown task type 'perl'"),
        ("shell:1:1:1:   ", "cmd", "empty"),
    ],
)
def test_bad_line_names_file_line_and_field(line: str, field: str | None, words: str) -> None:
    err = refused(parse_lines, f"shell:1:1:1:ok\n\n{line}\n", "sweep.txt")
    (problem,) = err.problems
    assert (problem.source, problem.line, problem.field) == ("sweep.txt", 3, field)
    assert words in problem.message
    assert "; " in problem.message, "the message must also say how to fix it"
    assert "sweep.txt:3" in str(err)


def test_every_bad_column_on_a_line_is_reported() -> None:
    err = refused(parse_lines, "perl:x:y:-1:")
    assert [p.field for p in err.problems] == ["type", "priority", "mem", "cpus", "cmd"]


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tasks.txt"
    path.write_bytes(b"shell:1:1:1:echo ok\nshell:1:1:1:echo caf\xe9\n")
    with pytest.raises(SpecError) as info:
        parse_task_file(path)
    (problem,) = info.value.problems
    assert (problem.source, problem.line) == (str(path), 2)
    assert "UTF-8" in problem.message


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "tasks.txt"
    path.write_bytes(b"\xef\xbb\xbfshell:1:1:1:echo ok\n")
    assert [s.cmd for s in parse_task_file(path)] == ["echo ok"]


def test_one_bad_line_in_ten_thousand_refuses_the_file(tmp_path: Path) -> None:
    lines = [f"shell:1:1:1:./run --seed {n}" for n in range(1, 10_001)]
    lines[7776] = "shell:1:1:many:./run --seed 7777"
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n")
    result: list[TaskSpec] | None = None
    with pytest.raises(SpecError) as info:
        result = parse_task_file(path)
    assert result is None
    (problem,) = info.value.problems
    assert (problem.line, problem.field) == (7777, "cpus")
    assert f"{path}:7777" in str(info.value)


def test_problems_are_capped_but_counted() -> None:
    text = "\n".join("shell:x:1:1:true" for _ in range(30))
    err = refused(parse_lines, text, max_problems=5)
    assert len(err.problems) == 5
    assert err.total == 30
    assert "... and 25 more" in str(err)
    assert [p.line for p in err.problems] == [1, 2, 3, 4, 5]


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(SpecError) as info:
        parse_task_file(path)
    (problem,) = info.value.problems
    assert problem.source == str(path)
    assert "no such file" in problem.message and "check the path" in problem.message


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        parse_task_file(tmp_path)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("t.toml", '[[task]]\ncmd = "true"\n'),
        ("t.TOML", '[[task]]\ncmd = "true"\n'),
        ("t.jsonl", '{"cmd": "true"}\n'),
        ("t.ndjson", '{"cmd": "true"}\n'),
        ("t.txt", "shell:0:0:1:true\n"),
        ("tasks", "shell:0:0:1:true\n"),
    ],
)
def test_format_is_chosen_by_suffix(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_text(body)
    (spec,) = parse_task_file(path)
    assert spec.cmd == "true"


# --------------------------------------------------------------------------- JSON Lines

FULL_FIELDS: dict[str, Any] = {
    "cmd": "./train --lr 0.1",
    "name": "train-0.1",
    "type": "shell",
    "priority": 7,
    "mem": "1.5G",
    "mem_limit": "3G",
    "cpus": 4,
    "gpus": 1,
    "resources": {"license": 1},
    "timeout": "1h30m",
    "retries": 2,
    "retry_delay": "30s",
    "env": {"SEED": 3, "DEBUG": True, "MODE": "fast"},
    "cwd": "/data/runs",
    "tags": ["sweep", "gpu", "sweep"],
}

FULL_SPEC = TaskSpec(
    cmd="./train --lr 0.1",
    name="train-0.1",
    priority=7,
    mem=int(1.5 * GIB),
    mem_limit=3 * GIB,
    cpus=4,
    gpus=1,
    resources=(("license", 1),),
    timeout=5400.0,
    retries=2,
    retry_delay=30.0,
    env=(("DEBUG", "true"), ("MODE", "fast"), ("SEED", "3")),
    cwd="/data/runs",
    tags=("sweep", "gpu"),
)


def test_known_fields_are_the_documented_ones() -> None:
    # + the python-task fields, tested in test_python_tasks.py
    assert set(KNOWN_FIELDS) == set(FULL_FIELDS) | {"func", "args", "kwargs"}


def test_jsonl_all_fields() -> None:
    text = "# generated\n\n" + json.dumps(FULL_FIELDS) + "\n"
    (spec,) = parse_jsonl(text, "t.jsonl")
    assert spec == FULL_SPEC
    assert spec.source == "t.jsonl:3"


def test_jsonl_cmd_list_is_shell_quoted() -> None:
    (spec,) = parse_jsonl('{"cmd": ["echo", "two words", "$HOME"], "tags": "one"}', "t.jsonl")
    assert spec.cmd == "echo 'two words' '$HOME'"
    assert spec.tags == ("one",)


def test_jsonl_unknown_field_suggests_nearest() -> None:
    err = refused(parse_jsonl, '{"cmd": "true", "memory": "4G"}\n', "t.jsonl")
    (problem,) = err.problems
    assert (problem.line, problem.field) == (1, "memory")
    assert problem.message == "unknown field 'memory'; did you mean 'mem'?"


def test_jsonl_bad_json_and_non_objects() -> None:
    text = (
        '{"cmd": "true"}\n{"cmd": "true",}\n[1, 2]\n{"name": "no cmd"}\n{"cmd": "x", "mem": NaN}\n'
    )
    err = refused(parse_jsonl, text, "t.jsonl")
    assert [(p.line, p.field) for p in err.problems] == [
        (2, None),
        (3, None),
        (4, "cmd"),
        (5, "mem"),
    ]
    assert "invalid JSON" in err.problems[0].message
    assert "JSON object" in err.problems[1].message


def test_jsonl_empty_gives_no_tasks() -> None:
    assert parse_jsonl("\n# nothing yet\n", "t.jsonl") == []


# --------------------------------------------------------------------------- TOML


def test_toml_all_fields_and_header_lines() -> None:
    text = """\
# sweep
[[task]]
cmd = "./train --lr 0.1"
name = "train-0.1"
type = "shell"
priority = 7
mem = "1.5G"
mem_limit = "3G"
cpus = 4
gpus = 1
resources = { license = 1 }
timeout = "1h30m"
retries = 2
retry_delay = 30
tags = ["sweep", "gpu", "sweep"]
cwd = "/data/runs"
env = { SEED = 3, DEBUG = true, MODE = "fast" }

[[task]]
cmd = ["sleep", "1"]
"""
    first, second = parse_toml(text, "t.toml")
    assert first == FULL_SPEC
    assert (first.source, second.source) == ("t.toml:2", "t.toml:19")
    assert second.cmd == "sleep 1"


def test_toml_defaults_merge() -> None:
    text = """\
[defaults]
cpus = 2
mem = "4G"
env = { OMP_NUM_THREADS = "2", MODE = "slow" }
tags = ["sweep"]

[[task]]
cmd = "a"

[[task]]
cmd = "b"
cpus = 8
env = { MODE = "fast" }
tags = ["big", "sweep"]
"""
    a, b = parse_toml(text, "t.toml")
    assert (a.cpus, a.mem, a.env, a.tags) == (
        2,
        4 * GIB,
        (("MODE", "slow"), ("OMP_NUM_THREADS", "2")),
        ("sweep",),
    )
    assert (b.cpus, b.mem, b.env, b.tags) == (
        8,
        4 * GIB,
        (("MODE", "fast"), ("OMP_NUM_THREADS", "2")),
        ("sweep", "big"),
    )


def test_toml_errors_point_at_task_headers_and_defaults() -> None:
    text = """\
[defaults]
cpus = -3

[[task]]
cmd = "fine"

[[task]]
cmd = "x"
memroy = "2G"

[extra]
a = 1
"""
    err = refused(parse_toml, text, "t.toml")
    got = [(p.line, p.field) for p in err.problems]
    assert got == [(1, "cpus"), (7, "memroy"), (11, None)]
    assert "did you mean 'mem'?" in err.problems[1].message
    assert "'extra'" in err.problems[2].message


def test_toml_syntax_error_names_the_line() -> None:
    text = '[[task]]\ncmd = "ok"\n\n[[task]]\ncmd = "unterminated\n'
    err = refused(parse_toml, text, "t.toml")
    (problem,) = err.problems
    assert (problem.source, problem.line) == ("t.toml", 5)
    assert "TOML syntax error" in problem.message


def test_toml_without_tasks_is_refused() -> None:
    err = refused(parse_toml, "[defaults]\ncpus = 1\n", "t.toml")
    assert "no [[task]] tables found" in str(err)


def test_toml_task_must_be_array_of_tables() -> None:
    err = refused(parse_toml, '[task]\ncmd = "x"\n', "t.toml")
    assert err.problems[0].line == 1
    assert "[[task]]" in err.problems[0].message


# --------------------------------------------------------------------------- spec_from_fields


def test_spec_from_fields_builds_and_skips_none() -> None:
    spec = spec_from_fields({"cmd": "true", "timeout": None, "cpus": "3"}, "cli", 0)
    assert (spec.cmd, spec.cpus, spec.timeout, spec.source) == ("true", 3, None, "cli:0")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "x"}, "cmd"),
        ({"cmd": "x", "timeout": 0}, "timeout"),
        ({"cmd": "x", "retries": -1}, "retries"),
        ({"cmd": "x", "env": {"A=B": "1"}}, "env"),
        ({"cmd": "x", "env": {"A": [1]}}, "env"),
        ({"cmd": "x", "tags": [1]}, "tags"),
        ({"cmd": "x", "gpus": True}, "gpus"),
        ({"cmd": "x", "type": "python"}, "func"),
        ({"cmd": "x", "type": "perl"}, "type"),
        ({"cmd": "x", "prio": 1}, "prio"),
    ],
)
def test_spec_from_fields_raises_field_error(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError) as info:
        spec_from_fields(fields, "cli", 0)
    assert info.value.field == field


# --------------------------------------------------------------------------- properties

commands = st.text(
    alphabet=st.characters(exclude_characters="\n\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() != "")


@given(
    priority=st.integers(PRIORITY_MIN, PRIORITY_MAX),
    mem_gib=st.integers(0, 4096),
    cpus=st.integers(0, 4096),
    cmd=commands,
)
def test_line_round_trip(priority: int, mem_gib: int, cpus: int, cmd: str) -> None:
    (spec,) = parse_lines(f"shell:{priority}:{mem_gib}:{cpus}:{cmd}", "p.txt")
    assert (spec.priority, spec.mem, spec.cpus, spec.cmd) == (
        priority,
        mem_gib * GIB,
        cpus,
        cmd.strip(),
    )


line_like = st.lists(
    st.one_of(
        st.sampled_from(["shell", "python", "", " ", "#", "1", "-1", "0.5", "512M", "9" * 400]),
        st.text(max_size=12),
    ),
    max_size=7,
).map(":".join)


@settings(max_examples=300)
@given(st.one_of(st.text(), st.lists(line_like, max_size=5).map("\n".join)))
def test_parse_lines_only_ever_raises_spec_error(text: str) -> None:
    try:
        specs = parse_lines(text, "fuzz.txt")
    except SpecError as err:
        assert err.problems and err.total >= len(err.problems)
        assert all(p.source == "fuzz.txt" and p.line >= 1 for p in err.problems)
    else:
        assert all(isinstance(s, TaskSpec) and s.source.startswith("fuzz.txt:") for s in specs)


_UNITS = {"": GIB, "k": 1024, "m": MIB, "g": GIB, "t": 1024**4, "p": 1024**5}


@given(
    n=st.integers(0, 10**6),
    unit=st.sampled_from(sorted(_UNITS)),
    suffix=st.sampled_from(["", "b", "ib"]),
    upper=st.booleans(),
)
def test_parse_size_round_trip(n: int, unit: str, suffix: str, upper: bool) -> None:
    text = f"{n}{unit}{suffix if unit else ''}"
    assert parse_size(text.upper() if upper else text) == n * _UNITS[unit]


safe_text = st.text(
    alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
    max_size=20,
)
env_keys = safe_text.filter(lambda k: k != "" and "=" not in k)

specs = st.builds(
    TaskSpec,
    cmd=commands,
    name=st.none() | safe_text,
    priority=st.integers(PRIORITY_MIN, PRIORITY_MAX),
    mem=st.integers(0, 2**50),
    cpus=st.integers(0, 4096),
    gpus=st.integers(0, 1024),
    timeout=st.none() | st.floats(min_value=0.001, max_value=1e9),
    retries=st.none() | st.integers(0, 1000),
    # from_dict sorts env, so a canonical spec holds it sorted and unique.
    env=st.dictionaries(env_keys, safe_text, max_size=4).map(lambda d: tuple(sorted(d.items()))),
    cwd=st.none() | safe_text,
    tags=st.lists(safe_text, max_size=4).map(tuple),
    source=safe_text,
)


@given(specs)
def test_task_spec_json_round_trip(spec: TaskSpec) -> None:
    back = TaskSpec.from_json(spec.to_json())
    assert back == spec
    assert back.source == spec.source


@given(specs, safe_text)
def test_dedup_key_is_stable_and_tracks_cmd(spec: TaskSpec, other_source: str) -> None:
    key = spec.dedup_key()
    assert key == spec.dedup_key()
    assert key == TaskSpec.from_json(spec.to_json()).dedup_key()
    assert key == dataclasses.replace(spec, source=other_source).dedup_key()
    assert key != dataclasses.replace(spec, cmd=spec.cmd + " --again").dedup_key()


def test_resources_field() -> None:
    (spec,) = parse_jsonl('{"cmd": "run", "resources": {"license": 2, "disk": 1}}\n', "r.jsonl")
    assert spec.resources == (("disk", 1), ("license", 2))
    with pytest.raises(SpecError) as err:
        parse_jsonl('{"cmd": "run", "resources": {"license": 0}}\n', "r.jsonl")
    assert "resources" in str(err.value)
