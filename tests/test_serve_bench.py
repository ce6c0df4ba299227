"""serve-bench and profile CLIs on the tiny random model (fast; SmolLM2 runs are benchmarks)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rtlm_adapt.calibration.step_cost import StepCost  # noqa: E402
from rtlm_adapt.calibration.step_fit import STEP_COLUMNS, run_steps  # noqa: E402
from rtlm_adapt.cli import main  # noqa: E402

SIMULATE_KEYS = {
    "mean_rt_s",
    "p50_rt_s",
    "p99_rt_s",
    "deadline_miss_rate",
    "throughput_rps",
    "completed",
    "failed",
}


def _tiny_cost(path, name, batch):
    StepCost(
        name=name,
        decode_s_base=0.004,
        decode_s_per_seq=0.0005,
        decode_s_per_ctx_token=1e-6,
        prefill_s_base=0.004,
        prefill_s_per_token=2e-5,
        max_batch_size=batch,
    ).save(path)
    return str(path)


def _tiny_bench(tmp_path, alpaca_file, policies: str) -> list[str]:
    """serve-bench on the tiny model: 8 requests at load 0.8, 12 tokens, a made-up profile."""
    return [
        "serve-bench",
        "--model", "tiny",
        "--prompts", str(alpaca_file),
        "--tokenizer", "words",
        "--requests", "8",
        "--load", "0.8",
        "--seed", "3",
        "--policies", policies,
        "--max-tokens", "12",
        "--profile", _tiny_cost(tmp_path / "p.json", "tiny-p", 4),
    ]  # fmt: skip


def test_serve_bench_tiny_writes_the_documented_json(tmp_path, alpaca_file):
    out = tmp_path / "bench.json"
    argv = [
        *_tiny_bench(tmp_path, alpaca_file, "fcfs,heuristic"),
        "--secondary-profile", _tiny_cost(tmp_path / "s.json", "tiny-s", 2),
        "--threads", "1",
        "--secondary-threads", "1",
        "--compare-sim",
        "--no-progress",
        "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert set(payload["policies"]) == {"fcfs", "heuristic"}
    for figures in payload["policies"].values():
        assert SIMULATE_KEYS <= set(figures)
        assert figures["completed"] + figures["failed"] == 8
        assert figures["mean_rt_s"] > 0
    assert set(payload["sim_fidelity"]) == {"fcfs", "heuristic"}
    for fid in payload["sim_fidelity"].values():
        assert {"mean_rt_ratio_sim_over_real", "spearman"} <= set(fid)
        assert fid["mean_rt_ratio_sim_over_real"] > 0
    assert payload["workload"]["requests"] == 8
    assert payload["executor"]["secondary_threads"] == 1
    assert payload["executor"]["secondary_choice"] == "requested"
    records = payload["policies"]["fcfs"]["requests"]
    assert len(records) == 8 and {"id", "output_tokens", "response_time_s"} <= set(records[0])
    check = payload["policies"]["fcfs"]["step_check"]["primary"]
    assert check["steps"] > 0 and check["real_over_profile"] > 0
    assert check["joins"] + check["rebuilds"] >= 1
    # every single-iteration step, compactly, and the profiles served with in full
    steps = payload["policies"]["fcfs"]["steps"]["primary"]
    assert steps["columns"] == list(STEP_COLUMNS)
    rows = steps["rows"]
    assert len(rows) == check["steps"] and all(len(r) == len(STEP_COLUMNS) for r in rows)
    assert sum(r[6] for r in rows) == pytest.approx(check["busy_s"], abs=1e-4)
    assert sum(r[4] for r in rows) >= 1 and all(r[2] >= r[1] for r in rows)  # joins; padding
    done_at = [r[7] for r in rows]
    assert done_at == sorted(done_at) and done_at[-1] >= sum(r[6] for r in rows)
    assert "secondary" in payload["policies"]["fcfs"]["steps"]
    assert StepCost.from_dict(payload["profiles"]["primary"]).name == "tiny-p"
    assert run_steps(payload, policy="fcfs", target="step") == [r[:7] for r in rows]
    cycles = run_steps(payload, policy="fcfs")
    assert all(c[6] >= r[6] for c, r in zip(cycles, rows, strict=True))


def test_secondary_is_used_only_with_a_spare_core(monkeypatch):
    from rtlm_adapt import serve_bench

    monkeypatch.setattr(serve_bench.os, "cpu_count", lambda: 2)
    assert serve_bench.secondary_threads_for(None, 2)[0] == 0
    assert serve_bench.secondary_threads_for(None, 1)[0] == 1
    assert serve_bench.secondary_threads_for(0, 1) == (0, "requested: none")
    assert serve_bench.secondary_threads_for(2, 2) == (2, "requested")
    monkeypatch.setattr(serve_bench.os, "cpu_count", lambda: 16)
    assert serve_bench.secondary_threads_for(None, 8)[0] == 1
    with pytest.raises(ValueError, match="secondary-threads"):
        serve_bench.secondary_threads_for(-1, 2)


def test_serve_bench_refuses_oracle_policies(tmp_path, alpaca_file, capsys):
    argv = ["serve-bench", "--model", "tiny", "--prompts", str(alpaca_file), "--tokenizer",
            "words", "--policies", "oracle-sjf", "--requests", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "true lengths" in capsys.readouterr().err


def test_profile_cli_tiny(tmp_path):
    out = tmp_path / "tiny.json"
    argv = ["profile", "--model", "tiny", "--out", str(out), "--threads", "1",
            "--batch-sizes", "1,2", "--prompt-lengths", "8,16,32", "--context-lengths", "16,32",
            "--repeats", "1", "--max-batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    cost = StepCost.load(str(out))
    assert cost.name == "tiny" and cost.max_batch_size == 2
    assert cost.step_time(2, 64) > 0
    # the tiny HFExecutor's membership changes are measured and its attention is padded
    assert cost.padded_context and cost.join_s > 0 and cost.leave_s > 0
    assert set(cost.extra["membership_points_s"]) == {"b2_ctx16", "b2_ctx32"}
    assert len(cost.extra["load_average_before"]) == 3


@pytest.mark.slow  # serve-bench with a process per policy: ~9 s
def test_serve_bench_isolated_and_calibrated(tmp_path, alpaca_file):
    # Each policy in a fresh process, after a calibration run whose steps give the profile the
    # simulator replays with; the served profile's fidelity is kept alongside.
    out = tmp_path / "bench.json"
    argv = [
        *_tiny_bench(tmp_path, alpaca_file, "heuristic"),
        "--threads", "1",
        "--secondary-threads", "0",
        "--calibrate", "6",
        "--isolate",
        "--compare-sim",
        "--no-progress",
        "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["executor"]["process_per_policy"] is True
    for name, figures in payload["policies"].items():
        assert figures["completed"] + figures["failed"] == 8
        cal = figures["calibration"]
        assert cal["requests"] == 6 and cal["step_check"]["primary"]["steps"] > 0
        fitted = StepCost.from_dict(cal["profile"])
        assert fitted.name == "tiny-p-calibrated" and fitted.max_batch_size == 4
        # the tiny model on this CPU costs nothing like the made-up profile: the fit moved
        assert fitted != StepCost.load(tmp_path / "p.json")
        by_profile = payload["sim_fidelity_by_profile"]
        assert by_profile["calibrated"][name]["profile"] == "tiny-p-calibrated"
        assert by_profile["served"][name]["profile"] == "tiny-p"
        assert payload["sim_fidelity"][name] == by_profile["calibrated"][name]


def test_serve_bench_rejects_a_negative_calibration(tmp_path, alpaca_file, capsys):
    with pytest.raises(SystemExit):
        main(["serve-bench", "--model", "tiny", "--prompts", str(alpaca_file), "--calibrate", "-1"])
    assert "--calibrate" in capsys.readouterr().err


def test_serve_bench_takes_an_encoder_for_the_encoder_tier(monkeypatch, alpaca_file, capsys):
    from rtlm_adapt import serve_bench

    seen = {}

    def capture(args, samples, counter_kind):
        seen["t"] = args.tier
        return 0

    monkeypatch.setattr(serve_bench, "cmd_serve_bench", capture)
    base = ["serve-bench", "--model", "tiny", "--prompts", str(alpaca_file), "--tokenizer", "words"]
    assert main([*base, "--tier", "encoder", "--encoder", "smollm2-l16"]) == 0
    assert seen["t"] == "encoder:smollm2-l16"
    assert main([*base, "--encoder", "smollm2-l16"]) == 2  # lexical tier: no encoder
    assert "--encoder smollm2-l16 needs --tier encoder" in capsys.readouterr().err


def _never_loads(*_args, **_kwargs):
    raise AssertionError("serve-bench loaded a model despite a bad flag")


def test_serve_bench_unknown_model_is_a_one_line_error_before_any_loading(
    monkeypatch, alpaca_file, capsys
):
    from huggingface_hub import constants

    from rtlm_adapt import serve_bench

    monkeypatch.setattr(serve_bench, "load_executor", _never_loads)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without the hub
    base = ["serve-bench", "--prompts", str(alpaca_file), "--tokenizer", "words"]
    assert main([*base, "--model", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtlm-adapt serve-bench: error: model 'nosuch'")
    assert "hub cannot be reached" in err and len(err.splitlines()) == 1
    assert main([*base, "--model", "./no/such/folder"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_serve_bench_json_folder_is_made_before_the_run(monkeypatch, tmp_path, alpaca_file):
    from rtlm_adapt import serve_bench

    out = tmp_path / "missing" / "deeper" / "bench.json"
    seen = {}

    def load_executor(*_args, **_kwargs):
        seen["folder_ready"] = out.parent.is_dir()
        raise ValueError("stop before the run")

    monkeypatch.setattr(serve_bench, "load_executor", load_executor)
    assert main([*_tiny_bench(tmp_path, alpaca_file, "fcfs"), "--json", str(out)]) == 2
    assert seen == {"folder_ready": True}


def test_serve_bench_unwritable_json_fails_before_the_run(
    monkeypatch, tmp_path, alpaca_file, capsys
):
    from rtlm_adapt import serve_bench

    monkeypatch.setattr(serve_bench, "load_executor", _never_loads)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "bench.json"  # its "folder" is a file
    assert main([*_tiny_bench(tmp_path, alpaca_file, "fcfs"), "--json", str(out)]) == 2
    assert f"--json {out}: cannot create its folder" in capsys.readouterr().err


def test_profile_unknown_model_is_a_one_line_error(capsys):
    assert main(["profile", "--model", "./no/such/folder", "--out", "x.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rtlm-adapt profile: error: model './no/such/folder': no such folder"
