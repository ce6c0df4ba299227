"""Controller cost per request in CPU instructions (callgrind), which host noise cannot move.

Wall-clock timings on a shared machine swing by 20% from minute to minute (BENCHMARKS.md,
section 2); instruction counts under ``valgrind --tool=callgrind`` repeat exactly. This runs
``benchmarks/overhead.py``'s harness (``controller_costs``: 1,000 requests queued, heuristic
policy, default predictor) under callgrind for two request counts and reports the difference per
request, so the one-off work (imports, loading prompts, scoring them) cancels out. The harness's
own per-request work (building each Request and Completion, copying the features dict, the
timers) is measured the same way with a stand-in controller that only queues, and subtracted.

    python benchmarks/overhead_instructions.py                    # the working tree
    python benchmarks/overhead_instructions.py --rev 4077e0c      # a commit, for an A/B
    python benchmarks/overhead_instructions.py --json out.json

Needs ``valgrind`` (Debian: ``apt-get install valgrind``). About a minute per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside valgrind. SNAP: a folder holding the rtlm_adapt package to measure (a snapshot of a
# revision) instead of the installed one; MODE "null": a stand-in controller (the harness alone).
_CHILD = r"""
import os, sys
from collections import deque
snap = os.environ.get("SNAP")
if snap:  # measure the snapshot, not the (editable) installed package
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, snap)
sys.path.insert(0, os.environ["BENCH_DIR"])
# the revision's own harness, with the data loaders it imports (their module moved over time)
from overhead import TokenCounter, controller_costs, load_prompts
from rtlm_adapt.controller import AdaptiveController

if os.environ.get("MODE") == "null":
    class _Balanced:
        balanced = True

    def submit(self, request, features=None):
        self._waiting.append(request)

    def next_batch(self, state):
        if not hasattr(self, "_waiting"):
            self._waiting = deque()
            return []
        return [self._waiting.popleft()]

    AdaptiveController.submit = submit
    AdaptiveController.next_batch = next_batch
    AdaptiveController.on_finish = lambda self, completion: None
    AdaptiveController.__len__ = lambda self: len(self._waiting)
    AdaptiveController.stats = lambda self: _Balanced()

samples = load_prompts(os.environ["PROMPTS"], tokenizer=TokenCounter.words())
controller_costs([s.prompt for s in samples], [s.response_tokens for s in samples],
                 int(os.environ["QUEUED"]), int(sys.argv[1]), "heuristic", "lexical")
"""


def instructions(n: int, env: dict[str, str]) -> int:
    """Instructions callgrind counts for the whole child run with ``n`` timed requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-c", _CHILD, str(n)],
            env=env, check=True, capture_output=True, cwd=ROOT,
        )  # fmt: skip
        match = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no summary line in {out}")
        return int(match.group(1))


def per_request(env: dict[str, str], small: int, large: int) -> float:
    return (instructions(large, env) - instructions(small, env)) / (large - small)


def snapshot(rev: str, dest: Path) -> None:
    """``rev``'s package as it is installed (rtlm_adapt/ with policies/ and envs/ inside), and
    its own harness, benchmarks/overhead.py, which feeds the controller as that revision did."""
    archive = subprocess.run(
        ["git", "archive", rev, "rtlm_adapt", "policies", "envs", "benchmarks/overhead.py"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for sub in ("policies", "envs"):
        shutil.move(str(dest / sub), str(dest / "rtlm_adapt" / sub))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="measure this git revision instead of the working tree")
    ap.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--small", type=int, default=1000, help="timed requests, first run")
    ap.add_argument("--large", type=int, default=3000, help="timed requests, second run")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.large <= args.small:
        ap.error("--large must exceed --small")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")

    env = dict(
        os.environ,
        BENCH_DIR=str(ROOT / "benchmarks"),
        PROMPTS=args.prompts,
        QUEUED=str(args.queued),
        PYTHONHASHSEED="0",  # str hashes vary per process otherwise, and with them dict probes
    )
    with tempfile.TemporaryDirectory() as snap:
        if args.rev:
            snapshot(args.rev, Path(snap))
            env["SNAP"] = snap
            env["BENCH_DIR"] = str(Path(snap) / "benchmarks")
        total = per_request(env, args.small, args.large)
        harness = per_request(dict(env, MODE="null"), args.small, args.large)
    result = {
        "revision": args.rev or "working tree",
        "instructions_per_request": round(total),
        "harness_instructions_per_request": round(harness),
        "controller_instructions_per_request": round(total - harness),
        "queued": args.queued,
        "requests": [args.small, args.large],
        "prompts": args.prompts,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'revision':<36}{result['revision']}")
    for key in (
        "instructions_per_request",
        "harness_instructions_per_request",
        "controller_instructions_per_request",
    ):
        print(f"{key:<36}{result[key]:>10,}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
