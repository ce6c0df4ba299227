"""LengthAwareRouter against Ray Serve's default power-of-two router, through real Ray Serve.

Issue 18's done-means. Phases, all in one run:

1. **serve** (real Ray Serve, this machine): two engine applications side by side, each
   ``--replicas`` paced engine replicas (``--slots`` concurrent generations at
   ``--tokens-per-s`` each, a priority queue: the stand-in of
   :mod:`rtlm_adapt.integrations.paced_engine`, not a model), one behind Serve's default router,
   one behind ``LengthAwareRouter``. The same open-loop request sequence (AlpacaEval prompts with
   their real response lengths, Poisson arrivals at ``--load`` of the capacity) goes through each
   router's deployment handle from this process, the order alternating over ``--repeats``. The
   predictions come from the library's predictor, warmed on the other half of the prompts
   (split by prompt id), as an ingress would make them; both routers get the same ones, and the
   engines order their queues by the same key: a routing-only comparison.

   ``--default-stack`` adds a third application to the same alternating run: Serve's default
   router in front of engines that serve their queue first come first served (vLLM's default
   ``fcfs`` policy), the stack a Serve user has today. Its results go under ``stacks``: the
   length-aware stack against it, and that ratio split into routing (length-aware / power-of-two,
   both key-ordered) times ordering (power-of-two key-ordered / the default stack).
   ``--slow-replica-factor F`` makes the last engine replica run at F times ``--tokens-per-s``
   (unequal replicas; the load is of the total capacity); each arm's share of requests and
   tokens on the slow replica goes under ``replicas``.
2. **overhead**: sequential zero-token calls, the two routers interleaved call by call: the
   latency a call pays for routing (median and mean difference to the default router).
3. **scaling, SIMULATED** (``_routing_sim.py``): the routing decision's cost and the mean and p99
   response time against power-of-two at 2, 4, 16 and 64 replicas, same workload, no Ray; also
   with a long group (a quarter of the replicas for the top tenth of predicted lengths).
4. ``--fault``: the full application (HTTP ingress, 2 engines, learner): a request stream,
   one engine replica killed mid-run, then the learner killed: how each request ended, and
   whether the learned count survived.

    python benchmarks/ray_router.py --json benchmarks/results/ray_router.json --fault
    python benchmarks/ray_router.py --default-stack --repeats 3 --json ray_router_stacks.json
    python benchmarks/ray_router.py --slow-replica-factor 0.5 --repeats 3 --json unequal.json
    python benchmarks/ray_router.py --quick      # about a minute, to try it out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _routing_sim import poisson_times, simulate  # noqa: E402

from rtlm_adapt.data import load_prompts  # noqa: E402
from rtlm_adapt.integrations.front import Front  # noqa: E402
from rtlm_adapt.knobs import Knobs  # noqa: E402
from rtlm_adapt.predictor import LengthPredictor  # noqa: E402

ROUTERS = ("power-of-two", "length-aware")
#: The applications a run can compare: (Serve router, engine queue order). The first two differ
#: in routing only; the default stack is what a Serve user with vLLM's defaults runs today.
ARMS = {
    "power-of-two": ("power-of-two", "priority"),
    "length-aware": ("length-aware", "priority"),
    "default-stack": ("power-of-two", "fcfs"),
}


@dataclass(frozen=True)
class Job:
    """One request of the sequence: when it arrives, its real length, the ingress's plan."""

    arrival_s: float
    true_tokens: int
    kwargs: dict[str, Any]

    @property
    def predicted(self) -> float:
        return float(self.kwargs["rtlm_predicted_tokens"])


def make_jobs(args: argparse.Namespace) -> tuple[list[Job], dict[str, Any]]:
    """The request sequence: test-half prompts drawn at random, Poisson arrivals at the load."""
    samples = load_prompts(f"alpaca:{args.model}")
    train = [s for s in samples if int(s.id) % 2 == 0]
    test = [s for s in samples if int(s.id) % 2 == 1]
    predictor = LengthPredictor.pretrained()
    front = Front(predictor, Knobs(offload_threshold=args.offload_threshold), args.tokens_per_s)
    for s in train:
        predictor.learn_one(front.plan(s.prompt).features, s.response_tokens)
    rng = np.random.default_rng(args.seed)
    picks = [test[i] for i in rng.integers(0, len(test), args.requests)]
    lengths = np.array([min(s.response_tokens, args.max_tokens) for s in picks])
    capacity = sum(speed_factors(args)) * args.slots * args.tokens_per_s / lengths.mean()
    arrivals = poisson_times(args.requests, args.load * capacity, args.seed)
    jobs = [
        Job(float(t), int(n), front.plan(s.prompt).handle_kwargs())
        for t, n, s in zip(arrivals, lengths, picks, strict=True)
    ]
    from scipy.stats import kendalltau

    tau = kendalltau([j.predicted for j in jobs], lengths).statistic
    workload = {
        "prompts": f"alpaca:{args.model} (odd ids; predictor warmed on the even ids)",
        "requests": args.requests,
        "mean_tokens": float(lengths.mean()),
        "p50_tokens": float(np.percentile(lengths, 50)),
        "p99_tokens": float(np.percentile(lengths, 99)),
        "cv_tokens": float(lengths.std() / lengths.mean()),
        "kendall_tau_predicted_vs_true": float(tau),
        "arrival_rate_per_s": float(args.load * capacity),
        "offloaded": sum(bool(j.kwargs["rtlm_offload"]) for j in jobs),
    }
    return jobs, workload


def speed_factors(args: argparse.Namespace) -> tuple[float, ...]:
    """Each replica's speed as a fraction of ``--tokens-per-s``: the last one slowed."""
    return (1.0,) * (args.replicas - 1) + (args.slow_replica_factor,)


def arms(args: argparse.Namespace) -> tuple[str, ...]:
    """The applications this run compares, in the order of even repeats."""
    return (*ROUTERS, "default-stack") if args.default_stack else ROUTERS


# -- phase 1 and 2: real Ray Serve ----------------------------------------------------------------
@dataclass(frozen=True)
class Done:
    """One answered request: its response time and where it ran."""

    rt_s: float
    tokens: int
    replica_tokens_per_s: float  # per slot: which speed of replica served it


async def run_trial(handle: Any, jobs: list[Job]) -> list[Done]:
    """Open loop: each request sent at its arrival time; its response time."""
    start = time.monotonic()

    async def one(job: Job) -> Done:
        delay = start + job.arrival_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        answer = await handle.generate.remote({"max_tokens": job.true_tokens}, **job.kwargs)
        rt = time.monotonic() - (start + job.arrival_s)
        return Done(rt, job.true_tokens, float(answer["tokens_per_s"]))

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def run_overhead(handles: dict[str, Any], calls: int) -> dict[str, list[float]]:
    """Sequential zero-token calls, routers interleaved call by call (order alternating)."""
    times: dict[str, list[float]] = {r: [] for r in ROUTERS}
    kwargs = {"rtlm_predicted_tokens": 100.0, "rtlm_priority": 0, "rtlm_offload": False}
    for i in range(calls):
        order = ROUTERS if i % 2 == 0 else ROUTERS[::-1]
        for router in order:
            t0 = time.perf_counter()
            await handles[router].generate.remote({"max_tokens": 0}, **kwargs)
            times[router].append(time.perf_counter() - t0)
    return times


def deploy_arms(args: argparse.Namespace) -> dict[str, Any]:
    """One engine application per arm, side by side; their handles."""
    from ray import serve

    from rtlm_adapt.integrations.ray_serve import ScaleOutSettings, engine_app

    handles = {}
    for arm in arms(args):
        router, queue_order = ARMS[arm]
        settings = ScaleOutSettings(
            engine_replicas=args.replicas,
            slots=args.slots,
            tokens_per_s=args.tokens_per_s,
            queue_order=queue_order,
            replica_speed_factors=speed_factors(args),
            router=router,
            long_replicas=args.long_replicas if router == "length-aware" else 0,
            engine_cpus=0.25,
        )
        serve.run(engine_app(settings), name=arm, route_prefix=None)
        handles[arm] = serve.get_deployment_handle("Engine", app_name=arm)
    return handles


def summarize(done: list[Done]) -> dict[str, float]:
    rts = [d.rt_s for d in done]
    return {"mean_rt_s": statistics.fmean(rts), "p99_rt_s": float(np.percentile(rts, 99))}


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """``a`` over ``b``, mean and p99."""
    return {k: a[k] / b[k] for k in ("mean_rt_s", "p99_rt_s")}


def serve_phases(args: argparse.Namespace, jobs: list[Job]) -> dict[str, Any]:
    from ray import serve

    names = arms(args)
    handles = deploy_arms(args)
    asyncio.run(run_overhead(handles, 20))  # warm both routers' paths
    for arm in names[len(ROUTERS) :]:  # and the extra arms'
        asyncio.run(run_trial(handles[arm], jobs[:20]))
    done: dict[str, list[Done]] = {a: [] for a in names}
    trials = []
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for arm in order:
            t0 = time.monotonic()
            got = asyncio.run(run_trial(handles[arm], jobs))
            done[arm].extend(got)
            trials.append(
                {
                    "router": arm,  # the arm (kept under this key for older readers)
                    "repeat": rep,
                    **summarize(got),
                    "wall_s": time.monotonic() - t0,
                    "loadavg_1m": os.getloadavg()[0],
                }
            )
            print(f"  {arm:>13} repeat {rep}: mean {trials[-1]['mean_rt_s']:.3f} s", flush=True)
    overhead = asyncio.run(run_overhead(handles, args.overhead_calls))
    for arm in names:
        serve.delete(arm)
    summary = {a: summarize(v) for a, v in done.items()}
    med = {r: statistics.median(v) * 1e3 for r, v in overhead.items()}
    mean = {r: statistics.fmean(v) * 1e3 for r, v in overhead.items()}
    results: dict[str, Any] = {
        "routers": {r: summary[r] for r in ROUTERS},
        "trials": trials,
        "per_repeat_mean_ratios": per_repeat_ratios(trials, names),
        "routing_overhead_ms": med["length-aware"] - med["power-of-two"],
        "overhead": {
            "calls_per_router": args.overhead_calls,
            "median_call_ms": med,
            "mean_call_ms": mean,
            "mean_difference_ms": mean["length-aware"] - mean["power-of-two"],
        },
        "replicas": {
            "speed_factors": list(speed_factors(args)),
            "slow_share": {a: slow_share(v, args) for a, v in done.items()},
        },
    }
    if args.default_stack:
        results["stacks"] = stacks_summary(summary)
    return results


def stacks_summary(summary: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The length-aware stack against the default one, and that ratio split in two factors."""
    aware, pow2, default = (
        summary["length-aware"],
        summary["power-of-two"],
        summary["default-stack"],
    )
    return {
        "default-stack": {**default, "router": "power-of-two", "engine_queue": "fcfs"},
        "length-aware": {**aware, "router": "length-aware", "engine_queue": "priority"},
        "length-aware_over_default-stack": ratio(aware, default),
        # The stack ratio = routing x ordering (exactly, as a product of the three pooled figures).
        "routing_part": ratio(aware, pow2),
        "ordering_part": ratio(pow2, default),
    }


def per_repeat_ratios(trials: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict]:
    """Each repeat's mean response time of every arm over power-of-two's in that repeat."""
    out = []
    for rep in sorted({t["repeat"] for t in trials}):
        means = {t["router"]: t["mean_rt_s"] for t in trials if t["repeat"] == rep}
        out.append({a: means[a] / means["power-of-two"] for a in names})
    return out


def slow_share(done: list[Done], args: argparse.Namespace) -> dict[str, float] | None:
    """The share of requests and of tokens the slowed replica served (None: all equal)."""
    if args.slow_replica_factor == 1.0:
        return None
    slow_speed = args.tokens_per_s * args.slow_replica_factor
    slow = [d for d in done if math.isclose(d.replica_tokens_per_s, slow_speed)]
    return {
        "requests": len(slow) / len(done),
        "tokens": sum(d.tokens for d in slow) / sum(d.tokens for d in done),
    }


# -- phase 3: simulated replay and scaling --------------------------------------------------------
def replay_phase(args: argparse.Namespace, jobs: list[Job]) -> dict[str, Any]:
    """SIMULATED: the very request sequence of the Serve phase (same arrivals, lengths,
    predictions, replicas and speeds) replayed on ``_routing_sim`` for every arm: how far the
    simulation's ratios are from the measured ones, before trusting its figures at scale."""
    common = dict(
        replicas=args.replicas,
        slots=args.slots,
        tokens_per_s=args.tokens_per_s,
        arrivals=[j.arrival_s for j in jobs],
        true_tokens=[j.true_tokens for j in jobs],
        predicted=[j.predicted for j in jobs],
        speed_factors=speed_factors(args),
    )
    out: dict[str, Any] = {}
    for arm in arms(args):
        router, queue_order = ARMS[arm]
        out[arm] = vars(simulate(router, **common, queue_order=queue_order))
    base = out["power-of-two"]
    out["mean_rt_ratios"] = {a: out[a]["mean_rt_s"] / base["mean_rt_s"] for a in arms(args)}
    return out


def scaling_phase(args: argparse.Namespace, jobs: list[Job]) -> dict[str, Any]:
    """SIMULATED: the same lengths and predictions, at 4, 16 and 64 replicas."""
    true = [j.true_tokens for j in jobs]
    pred = [j.predicted for j in jobs]
    mean_len = float(np.mean(true))
    long_threshold = float(np.quantile(pred, 0.9))
    out: dict[str, Any] = {}
    for n in args.sim_replicas:
        count = max(args.requests, 100 * n)  # enough requests to load every replica
        rng = np.random.default_rng(args.seed + n)
        pick = rng.integers(0, len(jobs), count)
        # Unequal replicas at scale: every second one slowed (two hardware generations).
        factors = [args.slow_replica_factor if r % 2 else 1.0 for r in range(n)]
        rate = args.load * sum(factors) * args.slots * args.tokens_per_s / mean_len
        arrivals = poisson_times(count, rate, args.seed + n)
        common = dict(
            replicas=n,
            slots=args.slots,
            tokens_per_s=args.tokens_per_s,
            arrivals=arrivals,
            true_tokens=[true[i] for i in pick],
            predicted=[pred[i] for i in pick],
            speed_factors=factors,
        )
        pow2 = simulate("power-of-two", **common)
        aware = simulate("length-aware", **common)
        # With a long group: a quarter of the replicas, for the top tenth of predictions.
        long_group = {"long_replicas": max(1, n // 4), "offload_threshold": long_threshold}
        grouped = simulate("length-aware", **common, **long_group)
        out[str(n)] = {
            "requests": count,
            "power-of-two": vars(pow2),
            "length-aware": vars(aware),
            "mean_rt_ratio": aware.mean_rt_s / pow2.mean_rt_s,
            "p99_rt_ratio": aware.p99_rt_s / pow2.p99_rt_s,
            "length-aware+long-group": {**vars(grouped), **long_group},
            "long_group_mean_rt_ratio": grouped.mean_rt_s / pow2.mean_rt_s,
            "long_group_p99_rt_ratio": grouped.p99_rt_s / pow2.p99_rt_s,
            "speed_factors": factors,
        }
        if args.default_stack:  # power-of-two in front of fcfs engines
            default = simulate("power-of-two", **common, queue_order="fcfs")
            out[str(n)]["default-stack"] = vars(default)
            out[str(n)]["stack_mean_rt_ratio"] = aware.mean_rt_s / default.mean_rt_s
            out[str(n)]["stack_p99_rt_ratio"] = aware.p99_rt_s / default.p99_rt_s
        print(f"  simulated {n:>3} replicas: mean ratio {out[str(n)]['mean_rt_ratio']:.3f}")
    return out


# -- phase 4: fault -------------------------------------------------------------------------------
async def _fault_stream(url: str, n: int, kill_after_s: float, kill: Any) -> list[str]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> str:
            await asyncio.sleep(i * 0.05)
            r = await client.post(
                "/v1/completions", json={"prompt": f"Question {i}?", "max_tokens": 200}
            )
            if r.status_code == 200:
                return "completed"
            return r.json()["error"]["message"].split(":")[0]

        calls = [asyncio.ensure_future(one(i)) for i in range(n)]
        await asyncio.sleep(kill_after_s)
        kill()
        return list(await asyncio.gather(*calls))


def fault_phase(args: argparse.Namespace, port: int, scratch: Path) -> dict[str, Any]:
    import ray
    from ray import serve

    from rtlm_adapt.integrations.ray_serve import build_app

    app = build_app(
        {
            "engine_replicas": 2,
            "slots": args.slots,
            "tokens_per_s": args.tokens_per_s,
            "learner_state_dir": str(scratch / "learner"),
            "engine_cpus": 0.25,
            "pull_every_s": 0.5,
        }
    )
    serve.run(app, name="fault", route_prefix="/")
    victim = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::fault#Engine")
    )[0]

    def kill() -> None:
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    outcomes = asyncio.run(_fault_stream(f"http://127.0.0.1:{port}", 60, 1.0, kill))
    learner = ray.get_actor("rtlm-learner", namespace="rtlm")
    time.sleep(1.0)  # the last examples reach the learner
    before = ray.get(learner.info.remote())
    ray.kill(learner, no_restart=False)
    deadline = time.monotonic() + 60
    after = ray.get(learner.info.remote())
    while after["pid"] == before["pid"] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = ray.get(learner.info.remote())
    serve.delete("fault")
    return {
        "requests": len(outcomes),
        "outcomes": dict(Counter(outcomes)),
        "lost": len(outcomes) - sum(Counter(outcomes).values()),
        "learned_before_kill": before["learned"],
        "learned_after_restart": after["learned"],
        "learner_restarted": after["pid"] != before["pid"],
    }


# -- driver ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--model", default="Mistral-7B-Instruct-v0.2", help="AlpacaEval model")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--tokens-per-s", type=float, default=1000.0)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--load", type=float, default=0.85)
    p.add_argument("--long-replicas", type=int, default=0)
    p.add_argument("--offload-threshold", type=float, default=float("inf"))
    p.add_argument("--overhead-calls", type=int, default=300)
    p.add_argument("--sim-replicas", type=int, nargs="+", default=[2, 4, 16, 64])
    p.add_argument("--fault", action="store_true")
    p.add_argument(
        "--default-stack",
        action="store_true",
        help="add a third arm: Serve's default router and FCFS engines (the stack users run)",
    )
    p.add_argument(
        "--slow-replica-factor",
        type=float,
        default=1.0,
        help="the last engine replica runs at this fraction of --tokens-per-s (unequal replicas)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer requests, one repeat")
    args = p.parse_args(argv)
    if args.slow_replica_factor <= 0:
        p.error("--slow-replica-factor must be > 0")
    if args.quick:
        args.requests, args.repeats, args.overhead_calls = 100, 1, 50
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    jobs, workload = make_jobs(args)
    print(f"workload: {json.dumps(workload)}")
    import ray
    from ray import serve

    scratch = Path(tempfile.mkdtemp(prefix="rtlm-ray-bench-"))
    os.environ.setdefault("RAY_TMPDIR", str(scratch))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        results = serve_phases(args, jobs)
        results["fault"] = fault_phase(args, port, scratch) if args.fault else None
    finally:
        serve.shutdown()
        ray.shutdown()
    results["replay_simulated"] = replay_phase(args, jobs)
    results["scaling_simulated"] = scaling_phase(args, jobs)
    results.update(
        workload=workload,
        settings={k: v for k, v in vars(args).items() if k != "json"},
        engine="paced stand-in (PacedEngine), not a model",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}",
    )
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(r: dict[str, Any]) -> None:
    base = r["routers"]["power-of-two"]
    print(f"\n{'router':>14} {'mean RT s':>10} {'p99 RT s':>10} {'mean x':>7} {'p99 x':>7}")
    for name, m in r["routers"].items():
        print(
            f"{name:>14} {m['mean_rt_s']:>10.3f} {m['p99_rt_s']:>10.3f} "
            f"{m['mean_rt_s'] / base['mean_rt_s']:>7.3f} {m['p99_rt_s'] / base['p99_rt_s']:>7.3f}"
        )
    print(f"routing overhead (median call, vs default): {r['routing_overhead_ms']:+.3f} ms")
    if r.get("stacks"):
        st = r["stacks"]
        default = st["default-stack"]
        print(
            f"default stack (power-of-two + fcfs engines): mean {default['mean_rt_s']:.3f} s,"
            f" p99 {default['p99_rt_s']:.3f} s"
        )
        for label in ("length-aware_over_default-stack", "routing_part", "ordering_part"):
            x = st[label]
            print(f"  {label:>32}: mean x {x['mean_rt_s']:.3f}, p99 x {x['p99_rt_s']:.3f}")
    for arm, share in r["replicas"]["slow_share"].items():
        if share:
            print(
                f"  {arm:>13} on the slow replica: {share['requests']:.1%} of requests,"
                f" {share['tokens']:.1%} of tokens"
            )
    replay = r["replay_simulated"]["mean_rt_ratios"]
    print("SIMULATED replay of the same sequence, mean x power-of-two:", end="")
    print("".join(f" {a} {x:.3f}" for a, x in replay.items()))
    print("\nSIMULATED scaling (same lengths and predictions):")
    print(
        f"{'replicas':>8} {'mean x':>7} {'p99 x':>7} {'+long mean x':>13} {'+long p99 x':>12}"
        f" {'pow2 us':>8} {'aware us':>9}"
    )
    for n, s in r["scaling_simulated"].items():
        stack = (
            f" stack mean x {s['stack_mean_rt_ratio']:.3f}" if "stack_mean_rt_ratio" in s else ""
        )
        print(
            f"{n:>8} {s['mean_rt_ratio']:>7.3f} {s['p99_rt_ratio']:>7.3f} "
            f"{s['long_group_mean_rt_ratio']:>13.3f} {s['long_group_p99_rt_ratio']:>12.3f} "
            f"{s['power-of-two']['decision_us']:>8.1f} {s['length-aware']['decision_us']:>9.1f}"
            f"{stack}"
        )
    if r.get("fault"):
        print(f"\nfault: {json.dumps(r['fault'])}")


if __name__ == "__main__":
    main()
