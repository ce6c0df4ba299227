"""fit_step_cost: a StepCost fitted to the steps a serving run took, and profile --from-run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.calibration.step_fit import (
    FIT_COLUMNS,
    STEP_COLUMNS,
    fit_step_cost,
    run_profile,
    run_steps,
)
from rtlm_adapt.cli import main

TRUE = StepCost(
    name="true",
    decode_s_base=0.08,
    decode_s_per_seq=0.004,
    decode_s_per_ctx_token=1.5e-5,
    prefill_s_base=0.1,
    prefill_s_per_token=0.0018,
    max_batch_size=16,
    kv_token_budget=32768,
    join_s=0.002,
    leave_s=0.003,
    padded_context=True,
)


def synthetic_rows(cost: StepCost, n: int = 600, seed: int = 0, outliers: int = 8):
    """Steps like a serving run's: random batches and contexts, prefill on joins, 2% noise,
    and a few steps stalled 3-10x (what contention does)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        batch = int(rng.integers(1, cost.max_batch_size + 1))
        longest = int(rng.integers(20, 600))
        context = int(batch * longest * rng.uniform(0.5, 1.0))
        attended = batch * longest
        joins = int(rng.integers(1, 3)) if rng.random() < 0.25 else 0
        prefill = int(joins * rng.integers(10, 300))
        leaves = int(rng.integers(1, 3)) if rng.random() < 0.2 else 0
        ctx = attended if cost.padded_context else context
        t = cost.step_time(batch, ctx, prefill, joins=joins, leaves=leaves)
        t *= 1 + rng.normal(0, 0.02)
        if i < outliers:
            t *= rng.uniform(3, 10)
        rows.append((batch, context, attended, prefill, joins, leaves, t))
    return rows


def test_fit_recovers_known_coefficients_despite_noise_and_outliers():
    base = dataclasses.replace(TRUE, name="base", decode_s_base=0.05, prefill_s_base=0.2)
    fit = fit_step_cost(synthetic_rows(TRUE), base, name="fit", source="synthetic")
    for key in ("decode_s_base", "decode_s_per_seq", "decode_s_per_ctx_token",
                "prefill_s_base", "prefill_s_per_token"):  # fmt: skip
        assert getattr(fit, key) == pytest.approx(getattr(TRUE, key), rel=0.1), key
    # membership terms are small next to a step: recovered to within a few milliseconds
    assert abs(fit.join_s - TRUE.join_s) < 0.004 and abs(fit.leave_s - TRUE.leave_s) < 0.004
    assert fit.name == "fit" and fit.padded_context and fit.max_batch_size == 16
    assert fit.kv_token_budget == 32768
    assert fit.extra["steps"] == 600 and fit.extra["steps_kept"] <= 600 - 8
    assert fit.extra["fit_mean_rel_err"] < 0.03
    assert fit.extra["fitted_from"] == "synthetic" and "synthetic" in fit.source
    assert fit.extra["outlier_share_of_busy_s"] > 0
    StepCost.from_dict(json.loads(fit.to_json()))  # a valid, loadable profile


def test_fit_stays_close_with_many_stalls():
    # 5% of the steps stalled 3-10x (a quarter of the busy time): all dropped, the fit holds
    rows = synthetic_rows(TRUE, outliers=30)
    fit = fit_step_cost(rows, TRUE, name="fit", source="synthetic")
    assert fit.extra["steps_kept"] <= 570 and fit.extra["outlier_share_of_busy_s"] > 0.2
    assert fit.decode_s_base == pytest.approx(TRUE.decode_s_base, rel=0.15)
    assert fit.decode_s_per_ctx_token == pytest.approx(TRUE.decode_s_per_ctx_token, rel=0.15)


def test_nnls_keeps_coefficients_non_negative():
    # steps that get faster with context would need a negative per-token cost
    rows = [(b, c * b, c * b, 0, 0, 0, 0.1 + 0.01 * b - 1e-6 * c * b)
            for b in range(1, 9) for c in (50, 100, 200, 400)]  # fmt: skip
    fit = fit_step_cost(rows, TRUE, name="fit", source="synthetic")
    for key in ("decode_s_base", "decode_s_per_seq", "decode_s_per_ctx_token", "join_s"):
        assert getattr(fit, key) >= 0


def test_no_prefill_steps_keep_the_base_prefill_and_say_so():
    rows = [r for r in synthetic_rows(TRUE) if r[3] == 0]
    base = dataclasses.replace(TRUE, prefill_s_base=0.5, prefill_s_per_token=0.01, join_s=0.02)
    fit = fit_step_cost(rows, base, name="fit", source="synthetic")
    assert fit.prefill_s_base == 0.5 and fit.prefill_s_per_token == 0.01 and fit.join_s == 0.02
    assert "prefill coefficients kept" in fit.source
    assert "prefill_s_base" in fit.extra["kept_from_base"]
    assert fit.decode_s_per_seq == pytest.approx(TRUE.decode_s_per_seq, rel=0.1)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([(1, 10, 10, 0, 0, 0, 0.1)] * 5, "too few steps"),
        ([(1, 10, 10, 0, 0, 0, float("nan"))] * 30, "non-finite duration_s"),
        ([(1, 10, float("inf"), 0, 0, 0, 0.1)] * 30, "non-finite attended_tokens"),
        ([(1, 10, 10, 0, 0, 0, 0.1, 9)] * 30, "7 columns"),
        ([(1, 10, 10, -4, 0, 0, 0.1)] * 30, "negative prefill_tokens"),
        ([(0, 10, 10, 0, 0, 0, 0.1)] * 30, "batch_size"),
        ([(1, 10, 10, 0, 0, 0, 0.0)] * 30, "duration_s must be > 0"),
        ([("a", 10, 10, 0, 0, 0, 0.1)] * 30, "must be numbers"),
    ],
)
def test_bad_steps_raise_value_errors_naming_the_problem(rows, match):
    with pytest.raises(ValueError, match=match):
        fit_step_cost(rows, TRUE, name="fit", source="bad")


def _recorded(rows, overhead: float = 0.0):
    """``FIT_COLUMNS`` rows as serve-bench records them: with ``done_at_s``, the loop taking
    ``overhead`` seconds between steps (and idling 1 s where the batch had emptied)."""
    out, at = [], 0.0
    for prev, row in zip([None, *rows], rows, strict=False):
        idle = prev is None or prev[0] <= row[5]
        at += row[6] + (1.0 if idle else overhead)
        out.append([*row, at])
    return out


def _run_json(path, rows_by_policy, profile=TRUE):
    payload = {
        "policies": {
            name: {
                "mean_rt_s": 1.0,
                "steps": {"primary": {"columns": list(STEP_COLUMNS), "rows": _recorded(rows)}},
            }
            for name, rows in rows_by_policy.items()
        },
        "profiles": {"primary": dataclasses.asdict(profile)},
        "profile": profile.name,
        "started_at_utc": "2026-01-01T00:00:00+00:00",
    }
    path.write_text(json.dumps(payload))
    return payload


def test_run_steps_reads_by_column_name_and_pools_policies(tmp_path):
    rows = [list(r) for r in synthetic_rows(TRUE, n=40)]
    payload = _run_json(tmp_path / "run.json", {"fcfs": rows[:30], "heuristic": rows[30:]})
    assert run_steps(payload, policy="fcfs", target="step") == rows[:30]
    assert len(run_steps(payload, target="step")) == 40
    # columns in another order are read by name
    steps = payload["policies"]["fcfs"]["steps"]["primary"]
    steps["columns"] = steps["columns"][::-1]
    steps["rows"] = [r[::-1] for r in steps["rows"]]
    assert run_steps(payload, policy="fcfs", target="step") == rows[:30]
    with pytest.raises(ValueError, match="target must be"):
        run_steps(payload, target="wall")
    assert run_profile(payload) == TRUE
    with pytest.raises(ValueError, match="'sjf' not in the run"):
        run_steps(payload, policy="sjf")
    with pytest.raises(ValueError, match="executor 'secondary'"):
        run_steps(payload, executor="secondary")
    del payload["policies"]["fcfs"]["steps"]
    with pytest.raises(ValueError, match="no recorded steps"):
        run_steps(payload, policy="fcfs")


def test_cycle_target_charges_the_loop_overhead_between_steps():
    rows = [list(r) for r in synthetic_rows(TRUE, n=300, outliers=0)]
    steps = {"columns": list(STEP_COLUMNS), "rows": _recorded(rows, overhead=0.01)}
    payload = {"policies": {"fcfs": {"steps": {"primary": steps}}}}
    cycles = run_steps(payload, target="cycle")
    # every cycle is the step plus the 10 ms the loop took, idle waits included (median fill)
    assert [c[:6] for c in cycles] == [r[:6] for r in rows]
    assert np.allclose([c[6] - r[6] for c, r in zip(cycles, rows, strict=True)], 0.01)
    step_fit = fit_step_cost(run_steps(payload, target="step"), TRUE, name="s", source="x")
    cycle_fit = fit_step_cost(cycles, TRUE, name="c", source="x")
    assert cycle_fit.decode_s_base - step_fit.decode_s_base == pytest.approx(0.01, rel=0.2)
    # a JSON without done_at_s can only be fitted to the steps alone
    steps["columns"], steps["rows"] = list(FIT_COLUMNS), [r[:7] for r in steps["rows"]]
    with pytest.raises(ValueError, match="target='step'"):
        run_steps(payload)


def test_profile_cli_from_run_writes_a_loadable_profile(tmp_path, capsys):
    run = tmp_path / "run.json"
    rows = [list(r) for r in synthetic_rows(TRUE, n=300)]
    base = dataclasses.replace(TRUE, name="served", decode_s_base=0.01)
    _run_json(run, {"fcfs": rows[:150], "heuristic": rows[150:]}, profile=base)
    out = tmp_path / "fitted.json"
    argv = ["profile", "--from-run", str(run), "--policy", "fcfs", "--out", str(out)]
    assert main(argv) == 0
    cost = StepCost.load(str(out))
    assert cost.name == "fitted" and cost.padded_context and cost.max_batch_size == 16
    assert cost.decode_s_base == pytest.approx(TRUE.decode_s_base, rel=0.15)
    assert cost.extra["steps"] == 150 and cost.extra["base_profile"] == "served"
    assert "policy fcfs" in cost.extra["fitted_from"] and str(run) in cost.source
    assert "target cycle" in cost.source
    assert main([*argv, "--target", "step", "--name", "alone"]) == 0
    assert StepCost.load(str(out)).name == "alone"
    # a policy the run lacks, or --model with --from-run: a clear error, exit 2
    assert main([*argv[:4], "sjf", "--out", str(out)]) == 2
    assert "'sjf' not in the run" in capsys.readouterr().err
    assert main([*argv, "--model", "tiny"]) == 2
    assert "no --model" in capsys.readouterr().err
