"""``experiments/bench_user_rounds.py --smoke``: both rows train, the probe row's collector has a source (CPU)."""

import json

import pytest
from experiment_scripts import import_experiment

from triaccel_rl.experiment import cpu_machine


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return import_experiment("bench_user_rounds")


def test_both_rows_train_and_only_the_probe_row_prepares_rounds(bench, tmp_path):
    out = tmp_path / "rounds.json"
    result = bench.main(bench.Args(smoke=True, out=str(out)))
    from triaccel_rl.compare import json_safe

    assert json.loads(out.read_text()) == json_safe(result)
    assert result["device"] == cpu_machine() and result["command"].startswith("python experiments/bench_user_rounds.py")
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(bench.ROWS)
    plain, probed = rows["heuristic"], rows["heuristic-probe"]
    assert plain["steps"] == probed["steps"] > 0 and plain["decisions"] == probed["decisions"] > 0
    # Without a probe no round is even planned; with one the warm-up round runs (on a CPU the budget then refuses
    # the charged rounds, which the tiny task's steps cannot repay).
    assert plain["warmup_round_ms"] == 0.0 and plain["rounds"] == 0 and plain["rounds_refused_for_budget"] == 0
    assert probed["warmup_round_ms"] > 0.0 and probed["rounds"] + probed["rounds_refused_for_budget"] > 0
    assert 0.0 < plain["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"models": "nope"}, "--models: unknown task 'nope'"), ({"probe": 3}, "--probe 3 must be >= 4")],
)
def test_bad_flags_are_refused_by_name_before_any_run(bench, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        bench.main(bench.Args(out=str(tmp_path / "r.json"), **changes))
