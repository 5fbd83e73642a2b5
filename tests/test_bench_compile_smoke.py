"""``experiments/bench_compile.py --smoke``: every row runs, stays finite, and compiles once (CPU, ``aot_eager``)."""

import json
import math
from types import SimpleNamespace

import pytest
from experiment_scripts import import_experiment, strict_json
from torch import nn

from triaccel_rl.experiment import cpu_machine
from triaccel_rl.tasks import get_task


@pytest.fixture(scope="module")
def bench_compile():  # type: ignore[no-untyped-def]
    return import_experiment("bench_compile")


def test_every_row_trains_and_the_compiled_rows_compile_once(bench_compile, tmp_path):
    out = tmp_path / "bench_compile.json"
    args = bench_compile.Args(smoke=True, warmup=3, steps=10, out=str(out), rows=",".join(bench_compile.ROWS))
    result = bench_compile.main(args)
    from triaccel_rl.compare import json_safe

    assert json.loads(out.read_text()) == json_safe(result)
    assert result["device"] == cpu_machine() and result["commit"] and result["date"].startswith("20")
    # The command that gave these rows (it was the caller's argv: pytest's here)
    assert result["command"].startswith("python experiments/bench_compile.py --rows") and str(out) in result["command"]
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(bench_compile.ROWS)
    for name, row in rows.items():
        assert row["finite"] and row["step_ms"] > 0 and len(row["chunk_ms"]) == 1
        if "compiled" not in name:
            assert row["graphs"] == 0, name
        assert not row["recompiled_while_timed"] and row["graph_breaks"] == 0, name
    # Rows share the models' code: a later row whose guards pass reuses an earlier row's graph.
    assert rows["plain-compiled"]["graphs"] == 1
    # --smoke times the synthetic task's MLP: one precision for each of its Linear layers, all bf16.
    n_layers = sum(isinstance(m, nn.Linear) for m in get_task("synthetic").build_model().modules())
    assert rows["controller-compiled"]["precisions"] == ["bf16"] * n_layers


def test_a_diverged_rows_losses_are_written_as_null(bench_compile, monkeypatch, tmp_path):
    """A row whose loss went NaN or infinite (``finite`` False) is written as strict JSON, the losses as null.

    Before, ``json.dumps`` wrote ``NaN`` and ``Infinity``, which strict parsers refuse."""
    measured = {"step_ms": 1.0, "chunk_ms": [1.0], "warmup_s": 0.0, "graphs": 0, "recompiled_while_timed": False,
                "graph_breaks": 0, "cudagraph_skips": 0, "step_peak_bytes": 0, "loss_first_last": [math.nan, math.inf],
                "finite": False, "precisions": "bf16", "fused": None}  # fmt: skip
    monkeypatch.setattr(bench_compile, "build_row", lambda *a: SimpleNamespace(name="plain-eager", controller=None))
    monkeypatch.setattr(bench_compile, "warm_up", lambda *a: None)
    monkeypatch.setattr(bench_compile, "time_rows", lambda rows, *a: [dict(measured) for _ in rows])
    out = tmp_path / "bench_compile.json"
    result = bench_compile.main(bench_compile.Args(smoke=True, rows="plain-eager", out=str(out)))
    assert math.isnan(result["rows"][0]["loss_first_last"][0])  # what main returns keeps the NaN
    (row,) = strict_json(out.read_text())["rows"]
    assert row["loss_first_last"] == [None, None] and row["finite"] is False


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("rows", "plain-eager,fast", "unknown row 'fast'"),
        ("precision", "fp8", "'fp8'"),
        ("steps", 15, "multiple of 10"),
        ("warmup", 0, "--warmup 0 must be >= 1"),
        # Before, an empty row list wrote a file of no rows, and an unknown model (on a GPU) was found only when its
        # turn came, after the earlier models' rows; a batch of 0 reached the data loader.
        ("rows", ",", "--rows ',' is empty"),
        ("models", "", "--models '' is empty"),
        ("models", "resnet18-fmnist,effnet-b1-fmnist", "--models: unknown task 'effnet-b1-fmnist'; allowed: "),
        ("batch_size", 0, "--batch-size 0 must be >= 1"),
    ],
)
def test_bad_arguments_are_named(bench_compile, flag, value, message, tmp_path):
    args = bench_compile.Args(smoke=True, out=str(tmp_path / "x.json"), **{flag: value})
    with pytest.raises(ValueError) as raised:
        bench_compile.main(args)
    assert message in str(raised.value)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(("given", "ran"), [({}, (3, 10)), ({"warmup": 5, "steps": 20}, (5, 20))])
def test_smoke_takes_a_few_steps_unless_given(bench_compile, monkeypatch, tmp_path, given, ran):
    """``--smoke``, documented as tiny, kept the GPU run's 30 warm-up and 100 timed steps (41 s a run)."""
    seen = []
    monkeypatch.setattr(bench_compile, "build_row", lambda *a: SimpleNamespace(name="plain-eager", controller=None))
    monkeypatch.setattr(bench_compile, "warm_up", lambda row, args, device: seen.append((args.warmup, args.steps)))
    monkeypatch.setattr(bench_compile, "time_rows", lambda rows, *a: [{"step_ms": 1.0} for _ in rows])
    monkeypatch.setattr(bench_compile, "print_table", lambda rows: None)
    args = bench_compile.Args(smoke=True, rows="plain-eager", out=str(tmp_path / "x.json"), **given)
    result = bench_compile.main(args)
    assert seen == [ran] and (result["args"]["warmup"], result["args"]["steps"]) == ran
