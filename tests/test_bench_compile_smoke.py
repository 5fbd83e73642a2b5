"""``experiments/bench_compile.py --smoke``: every row runs, stays finite, and compiles once (CPU, ``aot_eager``)."""

import json

import pytest
from experiment_scripts import import_experiment


@pytest.fixture(scope="module")
def bench_compile():  # type: ignore[no-untyped-def]
    return import_experiment("bench_compile")


def test_every_row_trains_and_the_compiled_rows_compile_once(bench_compile, tmp_path):
    out = tmp_path / "bench_compile.json"
    args = bench_compile.Args(smoke=True, warmup=3, steps=10, out=str(out), rows=",".join(bench_compile.ROWS))
    result = bench_compile.main(args)
    assert json.loads(out.read_text()) == result
    assert result["device"] == "cpu" and result["commit"] and result["date"].startswith("20") and result["command"]
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(bench_compile.ROWS)
    for name, row in rows.items():
        assert row["finite"] and row["step_ms"] > 0 and len(row["chunk_ms"]) == 1
        if "compiled" not in name:
            assert row["graphs"] == 0, name
        assert not row["recompiled_while_timed"] and row["graph_breaks"] == 0, name
    # Rows share the models' code: a later row whose guards pass reuses an earlier row's graph.
    assert rows["plain-compiled"]["graphs"] == 1
    assert rows["controller-compiled"]["precisions"] == ["bf16"] * len(rows["controller-compiled"]["precisions"])


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
