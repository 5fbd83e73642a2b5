"""JSON read from files: names that become paths stay one folder's name, and every refusal names its file."""

import json
import re
from pathlib import Path

import pytest
from test_gpu_benchmark_smoke import _job_file, gpu_benchmark_module

from triaccel_rl.config import HardwareProfile
from triaccel_rl.errors import ConfigError
from triaccel_rl.shield import ObservationStats

_DIGITS = "9" * 5000  # past Python's 4300-digit limit on int(str): json.loads raised a plain ValueError


@pytest.mark.parametrize("key", ["rows", "runs"])
@pytest.mark.parametrize(
    ("field", "name"),
    [("job", "../../escaped"), ("job", ".."), ("job", "/tmp/absolute"), ("model", "../../escaped"),
     ("model", "a/b"), ("model", "/tmp/absolute"), ("model", "."), ("model", 7)],
)  # fmt: skip
def test_merge_refuses_a_job_or_model_name_that_is_not_one_folder(tmp_path, key, field, name):
    """Plots go to ``--plots/<model>/jobs/<job>``, both names read from the file (a file's own ``job`` overrides its
    stem): before the fix ``../../escaped`` or an absolute name wrote the plots outside ``--plots``."""
    job = _job_file(tmp_path / "job_a.json", ["synthetic"])
    data = json.loads(job.read_text())
    for entry in data[key]:
        entry[field] = name
    job.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as raised:
        gpu_benchmark_module().merge([str(job)], tmp_path / "merged.json", plots=str(tmp_path / "plots" / "inside"))
    assert str(raised.value) == (
        f"--merge: {job} names a {field} {name!r}; a {field} must be one folder's name (no path separator, not "
        "'..'), as plots are written to --plots/<model>/jobs/<job>"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["job_a.json"]  # no plot, no merged file


def test_every_committed_result_files_names_are_folder_names():
    """Today's names (stems like ``smoke_resnet_6c182f0``, models like ``resnet18-fmnist``) still merge."""
    check = gpu_benchmark_module()._check_folder_name
    results = Path(__file__).resolve().parents[1] / "experiments" / "results"
    names = 0
    for path in sorted(results.rglob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "runs" not in data:
            continue  # not a result file of gpu_benchmark: --merge refuses it by name
        for key in ("rows", "grid", "runs"):
            for entry in data.get(key, []):
                tagged = {"job": path.stem, **entry}
                for field in ("job", "model"):
                    if field in tagged:
                        check(tagged[field], field, str(path))
                        names += 1
    assert names > 1000


def test_a_row_without_a_command_merges_with_its_own_or_the_default_epochs(tmp_path):
    """Before the fix a row without ``command`` raised a bare ValueError from a strict ``zip``, even where the row
    recorded ``epochs`` (``setdefault`` computed its default first)."""
    gpu_benchmark = gpu_benchmark_module()
    job = _job_file(tmp_path / "job_a.json", ["synthetic"])
    data = json.loads(job.read_text())
    for row in data["rows"]:
        del row["command"]
    data["rows"][0]["epochs"] = 3.0
    del data["rows"][1]["epochs"]
    job.write_text(json.dumps(data))
    merged = tmp_path / "merged.json"
    gpu_benchmark.merge([str(job), str(job)], merged)  # the second file is the same job: compared, taken once
    rows = json.loads(merged.read_text())["rows"]
    assert [(row["controller"], row["epochs"]) for row in rows] == [("static-fp16", 3.0), ("heuristic", 12.0)]
    assert gpu_benchmark._row_epochs({"controller": "static-fp16"}) == 12.0  # no command: the default budget
    assert gpu_benchmark._row_epochs({"controller": "static-fp16", "command": ""}) == 12.0
    for command in ("x --epochs", "x --epochs=", "x --epochs ten"):
        with pytest.raises(SystemExit) as raised:
            gpu_benchmark._row_epochs({"controller": "heuristic", "job": "job_a", "command": command})
        assert str(raised.value) == (
            f"--merge: row 'heuristic' of job 'job_a' has no number after --epochs in its command {command!r}"
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"rows": [], "grid": []}', 'holds no "runs"; give result JSONs this script wrote (rows, grid, runs)'),
        ("[1, 2]", 'holds no "runs"; give result JSONs this script wrote (rows, grid, runs)'),
        ('{"rows": [', "cannot be read as JSON: Expecting value"),
        (f'{{"runs": [], "n": {_DIGITS}}}', "cannot be read as JSON: Exceeds the limit (4300 digits)"),
    ],
)
def test_merge_refuses_a_file_that_is_not_a_result_file_by_name(tmp_path, text, message):
    path = tmp_path / "other.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as raised:
        gpu_benchmark_module().merge([str(path)], tmp_path / "merged.json")
    assert str(raised.value).startswith(f"--merge: {path} {message}")


def test_an_integer_past_the_digit_limit_is_refused_naming_the_file(tmp_path):
    """Python's digit limit raises a plain ValueError, not JSONDecodeError: before the fix it escaped the loaders'
    handlers, and the CLI printed it without the file."""
    path = tmp_path / "profile.json"
    path.write_text(f'{{"device": "x", "fixed_ms": {_DIGITS}}}')
    with pytest.raises(ConfigError) as raised:
        HardwareProfile.load(path)
    assert str(raised.value).startswith(f"hardware profile {path} is not valid JSON: Exceeds the limit (4300 digits)")
    stats = tmp_path / "policy.obs.json"
    stats.write_text(f'{{"low": [0], "high": [1], "n_observations": {_DIGITS}}}')
    with pytest.raises(ValueError) as raised_stats:
        ObservationStats.load(stats)
    assert str(raised_stats.value).startswith(
        f"observation stats {str(stats)!r} are not valid JSON: Exceeds the limit (4300 digits)"
    )


def test_json_nested_past_the_recursion_limit_is_refused_naming_the_file(tmp_path):
    """``json.loads("[" * 100000)`` raises a RecursionError, which escaped the loaders unnamed."""
    path = tmp_path / "profile.json"
    path.write_text("[" * 100_000)
    with pytest.raises(ConfigError, match=f"^hardware profile {re.escape(str(path))} is not valid JSON: "):
        HardwareProfile.load(path)
    stats = tmp_path / "policy.obs.json"
    stats.write_text("[" * 100_000)
    with pytest.raises(ValueError, match=f"^observation stats {re.escape(repr(str(stats)))} are not valid JSON: "):
        ObservationStats.load(stats)
    results = tmp_path / "job.json"
    results.write_text("[" * 100_000)
    with pytest.raises(SystemExit, match=f"^--merge: {re.escape(str(results))} cannot be read as JSON: "):
        gpu_benchmark_module().merge([str(results)], tmp_path / "merged.json")
