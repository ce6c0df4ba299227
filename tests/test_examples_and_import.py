"""The README's promises: a light import, and the embedding example runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "stable_baselines3", "gymnasium", "ray")


def test_import_is_light():
    code = (
        "import sys, rtlm_adapt, rtlm_adapt.controller, rtlm_adapt.serving.loop, "
        "rtlm_adapt.serving.sim, rtlm_adapt.data, rtlm_adapt.metrics, rtlm_adapt.policies, "
        "rtlm_adapt.integrations, rtlm_adapt.integrations.routing, rtlm_adapt.shadow, "
        "rtlm_adapt.policies.ppo, rtlm_adapt.policies.shadow_guard\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"heavy modules imported: {out.stdout}"


def _run_example(name: str) -> str:
    """The example's standard output (it must exit 0)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout


def test_embed_controller_example_runs():
    lines = _run_example("embed_controller.py").strip().splitlines()
    finished = [ln for ln in lines if "tokens" in ln]
    assert len(finished) == 4
    # short answers finish before long ones under the heuristic
    assert {finished[0].split(":")[0], finished[1].split(":")[0]} == {"r0", "r2"}
    assert "submitted=4" in lines[-1] and "finished=4" in lines[-1]


def test_readme_shows_the_example_as_it_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.index("## Embedding the controller")
    start = readme.index("```python\n", section) + len("```python\n")
    block = readme[start : readme.index("```", start)].strip()
    example = (ROOT / "examples" / "embed_controller.py").read_text()
    assert block in example
    assert len(block.splitlines()) <= 25


def test_shadow_replay_example_runs():
    """The replay of the served traffic under the policy that served it gives the run's own
    figure; under the heuristic, a shorter one."""
    out = _run_example("shadow_replay.py")
    means = {line.split(":")[0]: float(line.split()[-2]) for line in out.splitlines()}
    assert means["replayed under fcfs"] == means["served under fcfs"]
    assert means["replayed under heuristic"] < means["served under fcfs"]
