"""How much could preemption buy on the serve-bench workload? An oracle study in simulation.

Issue 5 asks the heuristic for a mean response time <= 0.85x FCFS's on the real SmolLM2 CPU
executor (p99 <= 2x, throughput >= 0.95x). ``sim_ceiling.py`` shows that reordering alone
cannot get there (oracle-sjf 0.95-1.0x): with 16 batch slots hardly anyone waits, and the
time goes into batched decode steps whose cost grows with padded attention (batch x the
longest context, ``StepCost.padded_context``). This script asks whether **preemption**
(pausing running requests so that others run in smaller or cheaper batches, or get a slot
sooner) could, before anyone builds it into the executor, loop and controller.

It rebuilds the serve-bench workload exactly as ``sim_ceiling.py`` does
(``workload_from_args``, SmolLM2's own lengths from a recorded run or a lengths file,
``replay_length``), and runs it through a small discrete-event simulator of a continuous
batching executor that charges StepCost's costs (decode with padded context, prefill, join,
leave) and supports preemption. With preemption off its FCFS and SJF must reproduce the
library's simulator (``run_policy``, ``SimulatedExecutor``); the script prints that check.

Preemption cost models:

- ``pause``: the paused row's KV cache is copied to host memory and back (plausible on a CPU
  with a 135M model). Pausing costs ``leave_s`` plus copying the row out, resuming ``join_s``
  plus copying it back (``--copy-s-per-token``, per context token; default from the -hf
  profile's membership points); no prefill. Membership costs are the shipped -hf profile's
  measured ones whatever the simulated profile (a fitted profile folds ``join_s`` into its
  prefill).
- ``recompute`` (vLLM): the paused row's cache is dropped; resuming re-prefills prompt +
  generated tokens (``prefill_s_base`` once per step, ``prefill_s_per_token`` per token,
  ``join_s``), as a new request's join does.

Policies (``oracle``: true remaining lengths; ``pred``: a noisy predictor with Kendall tau
~0.45 against the truth, see ``noisy_predictions``):

- ``fcfs``, ``sjf`` (oracle, non-preemptive), ``sjf-pred``: the references;
- ``srpt``: each step runs the <= cap requests with the least remaining tokens, pausing others;
- ``srpt-cN``: the same with an effective cap of N < 16 (smaller batches, less padding);
- ``srpt-longL``: SRPT, but at most L "long" requests (final context > the median) at once;
- ``wsrpt``: each decision picks the batch that maximises sum(1/remaining) / step time
  (Smith's rule over batches: shortest-remaining work per second of step, which weighs what
  a long context costs every member through padded attention); re-decided at every arrival
  and finish and every ``--recheck`` iterations (pause) or only at events (recompute);
- ``mcT`` (``marginal``): leave long contexts out of the batch while the step time they add
  to everyone outweighs their progress (``theta`` T); ``-guard``: nobody waits longer than
  the mean isolated service time in a row;
- ``[no padding]``: not preemption, the reference of an executor whose attention is not
  padded to the batch's longest context (paged / ragged attention), FCFS and SRPT;
  ``[2 buckets]``: the padded executor running its batch as two forwards (shortest contexts,
  then the rest; each pays ``decode_s_base``) whenever that is cheaper.

Every figure is a ratio to FCFS on the same arrivals. Settings: the 80-request serve-bench
workload with arrival seeds (``--seeds``; seed 0 is serve-bench's own arrival process, other
seeds redraw only the Poisson arrival times of the same 80 prompts at the same rate), and
``--resample N`` requests drawn with replacement from those 80 (prompt, length) pairs at the
same rate (``--resample-seeds``), so the figures are not just 80-request noise.

Usage::

    python benchmarks/studies/preemption_ceiling.py \\
        --lengths-from benchmarks/results/serve_bench_smollm2_abba_fcfs_heuristic.json \\
        --json benchmarks/results/preemption_ceiling_max256.json
    python benchmarks/studies/preemption_ceiling.py \\
        --lengths benchmarks/results/smollm2_lengths_max1024.json --max-tokens 1024 --load 0.48 \\
        --json benchmarks/results/preemption_ceiling_max1024.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: this is pure Python simulation

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rtlm_adapt.calibration.step_cost import StepCost  # noqa: E402
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion  # noqa: E402

QUEUED, RUNNING, PAUSED, EVICTED, DONE = range(5)
DEFAULT_FIT_FROM = "benchmarks/results/serve_bench_smollm2_abba_fcfs_heuristic.json"
HF_PROFILE = "smollm2-135m-cpu2-hf"


# ------------------------------------------------------------------------------------------
# The simulator
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Job:
    id: str
    arrival: float
    prompt: int  # prompt tokens
    target: int  # iterations it runs (replay_length of its real output)
    pred: float = math.nan  # predicted target (predicted-length policies)
    generated: int = 0
    state: int = QUEUED
    finish: float = math.nan
    preemptions: int = 0
    last_run: float = math.nan  # when it last ran or arrived (aging)

    @property
    def remaining(self) -> int:
        return self.target - self.generated

    @property
    def ctx(self) -> int:
        return self.prompt + self.generated


@dataclasses.dataclass(frozen=True)
class Membership:
    """What pausing and resuming a row costs (seconds)."""

    join_s: float
    leave_s: float
    copy_s_per_token: float


@dataclasses.dataclass
class Policy:
    """``choose(t, active, running, cap)`` returns the jobs to run in the next step(s)."""

    name: str
    choose: Callable[[float, list[Job], list[Job], int], list[Job]]
    preemptive: bool
    recheck: int | None = None  # re-decide every this many iterations (None: events only)


def simulate(
    jobs: Sequence[Job],
    cost: StepCost,
    policy: Policy,
    *,
    mode: str = "pause",
    membership: Membership,
    cap: int | None = None,
    buckets: bool = False,
) -> dict:
    """Serve ``jobs`` (fresh copies are made) on a continuous-batching executor costed by
    ``cost``; the policy decides at every arrival and finish (and every ``recheck``
    iterations) which requests run. Returns the per-request response times and counters."""
    if mode not in ("pause", "recompute"):
        raise ValueError(f"mode must be pause or recompute, got {mode!r}")
    cap = cap or cost.max_batch_size
    jobs = sorted((dataclasses.replace(j) for j in jobs), key=lambda j: (j.arrival, j.id))
    n = len(jobs)
    base, per_seq, per_ctx = cost.decode_s_base, cost.decode_s_per_seq, cost.decode_s_per_ctx_token
    padded = cost.padded_context
    t = 0.0
    nxt = 0
    active: list[Job] = []
    running: list[Job] = []
    left = 0
    done = 0
    steps = 0
    busy = 0.0
    batch_sum = 0
    preemptions = 0
    resumed_tokens = 0  # tokens re-prefilled (recompute) or copied back (pause)
    while done < n:
        while nxt < n and jobs[nxt].arrival <= t:
            job = jobs[nxt]
            job.last_run = job.arrival
            active.append(job)
            nxt += 1
        if not active:
            t = jobs[nxt].arrival
            continue
        chosen = policy.choose(t, active, running, cap)
        if not chosen:
            raise RuntimeError(f"{policy.name}: nothing chosen with {len(active)} waiting")
        extra = cost.leave_s * left
        left = 0
        prefill = 0
        was_running = {id(j) for j in running}
        for job in chosen:
            job.state = -1  # mark: chosen
        for job in running:
            if job.state != -1:  # preempted
                job.preemptions += 1
                preemptions += 1
                if mode == "pause":
                    job.state = PAUSED
                    extra += membership.leave_s + membership.copy_s_per_token * job.ctx
                else:
                    job.state = EVICTED
                    extra += cost.leave_s
        for job in chosen:
            if id(job) in was_running:
                pass
            elif job.generated == 0 or (mode == "recompute" and job.preemptions):
                # a new request, or an evicted one re-prefilled (recompute)
                prefill += job.ctx
                extra += cost.join_s
                resumed_tokens += job.generated
            else:  # paused: copy its row back
                extra += membership.join_s + membership.copy_s_per_token * job.ctx
                resumed_tokens += job.ctx
            job.state = RUNNING
        if prefill:
            extra += cost.prefill_s_base + cost.prefill_s_per_token * prefill
        running = chosen
        b = len(running)
        longest = max(j.ctx for j in running)
        total_ctx = sum(j.ctx for j in running)
        kmax = min(j.remaining for j in running)
        if policy.recheck:
            kmax = min(kmax, policy.recheck)
        next_arrival = jobs[nxt].arrival if nxt < n else math.inf
        a = base + per_seq * b
        lo, n_lo = longest, 0
        if buckets and padded and b > 1:
            # two forwards when that is cheaper: the i shortest rows, then the rest
            ctxs = sorted(j.ctx for j in running)
            best = b * longest
            for i in range(1, b):
                c = i * ctxs[i - 1] + (b - i) * longest + base / per_ctx if per_ctx else math.inf
                if c < best:
                    best, lo, n_lo = c, ctxs[i - 1], i
            if n_lo:
                a += base
        k = 0
        t0 = t
        t += extra
        while True:
            if n_lo:
                attended = n_lo * (lo + k) + (b - n_lo) * (longest + k)
            else:
                attended = b * (longest + k) if padded else total_ctx + b * k
            t += a + per_ctx * attended
            k += 1
            if k >= kmax or t >= next_arrival:
                break
        steps += k
        busy += t - t0
        batch_sum += b * k
        still = []
        for job in running:
            job.generated += k
            job.last_run = t
            if job.generated >= job.target:
                job.state = DONE
                job.finish = t
                left += 1
                done += 1
            else:
                still.append(job)
        if len(still) != len(running):
            running = still
            active = [j for j in active if j.state != DONE]
    rts = np.array([j.finish - j.arrival for j in jobs])
    makespan = max(j.finish for j in jobs) - min(j.arrival for j in jobs)
    return {
        "rt": {j.id: j.finish - j.arrival for j in jobs},
        "mean_rt_s": float(rts.mean()),
        "p50_rt_s": float(np.percentile(rts, 50)),
        "p99_rt_s": float(np.percentile(rts, 99)),
        "throughput_rps": n / max(makespan, 1e-9),
        "steps": steps,
        "mean_batch": batch_sum / max(steps, 1),
        "busy_fraction": busy / max(makespan, 1e-9),
        "preemptions": preemptions,
        "preempted_requests": sum(1 for j in jobs if j.preemptions),
        "resumed_tokens": resumed_tokens,
    }


# ------------------------------------------------------------------------------------------
# Policies
# ------------------------------------------------------------------------------------------


def non_preemptive(name: str, key: Callable[[Job], tuple]) -> Policy:
    def choose(t, active, running, cap):
        room = cap - len(running)
        if room <= 0:
            return running
        waiting = [j for j in active if j.state == QUEUED]
        if len(waiting) > room:
            waiting.sort(key=key)
        return running + waiting[:room]

    return Policy(name, choose, preemptive=False)


def remaining_fn(kind: str, residual: Callable[[int], float]) -> Callable[[Job], float]:
    """True remaining tokens (``oracle``), or the predictor's: predicted total minus generated,
    and once a request outlives its prediction, the workload's mean residual length given
    what it has generated (``pred``)."""
    if kind == "oracle":
        return lambda j: j.target - j.generated
    return lambda j: (j.pred - j.generated) if j.pred > j.generated else residual(j.generated)


def srpt(
    name: str,
    rem: Callable[[Job], float],
    *,
    eff_cap: int | None = None,
    max_long: int | None = None,
    is_long: Callable[[Job], bool] | None = None,
    recheck: int | None = None,
) -> Policy:
    def choose(t, active, running, cap):
        c = min(cap, eff_cap or cap)
        order = sorted(active, key=lambda j: (rem(j), j.state != RUNNING, j.arrival))
        if max_long is None:
            return order[:c]
        out, longs = [], 0
        for j in order:
            if is_long(j):
                if longs >= max_long:
                    continue
                longs += 1
            out.append(j)
            if len(out) >= c:
                break
        return out

    return Policy(name, choose, preemptive=True, recheck=recheck)


def wsrpt(
    name: str,
    rem: Callable[[Job], float],
    cost: StepCost,
    *,
    aging: float = 0.0,
    mean_service_s: float = 1.0,
    recheck: int | None = None,
    hold: float = 1.0,
) -> Policy:
    """Smith's rule over batches: the batch maximising sum(weight) / step time, weight
    1/remaining (+ aging * waited / mean service). For each candidate longest context m the
    best batch among requests with context <= m is a prefix of them by weight; ``hold`` > 1
    favours the running requests (hysteresis)."""
    a = cost.decode_s_base
    per_seq, per_ctx = cost.decode_s_per_seq, cost.decode_s_per_ctx_token
    padded = cost.padded_context

    def choose(t, active, running, cap):
        if len(active) <= 1:
            return list(active)
        ws = []
        for j in active:
            w = 1.0 / max(rem(j), 1.0)
            if aging:
                w += aging * (t - j.arrival) / mean_service_s / max(rem(j), 1.0)
            if j.state == RUNNING:
                w *= hold
            ws.append((w, j.ctx, j))
        by_weight = sorted(ws, key=lambda x: -x[0])
        best, best_set = -1.0, None
        for m in sorted({c for _, c, _ in ws}):
            total_w, b, ctx_sum, best_here = 0.0, 0, 0, 0.0
            chosen = []
            for w, c, j in by_weight:
                if c > m:
                    continue
                attended = (b + 1) * m if padded else ctx_sum + c
                step = a + per_seq * (b + 1) + per_ctx * attended
                ratio = (total_w + w) / step
                if chosen and ratio <= best_here:
                    break
                total_w, b, ctx_sum = total_w + w, b + 1, ctx_sum + c
                chosen.append(j)
                best_here = ratio
                if b >= cap:
                    break
            if chosen and best_here > best:
                best, best_set = best_here, chosen
        return best_set

    return Policy(name, choose, preemptive=True, recheck=recheck)


def marginal(
    name: str,
    rem: Callable[[Job], float],
    cost: StepCost,
    *,
    theta: float = 1.0,
    guard_s: float = math.inf,
    recheck: int | None = None,
) -> Policy:
    """Leave out long contexts while they cost the others more than they gain.

    For each candidate longest context m, S_m is the SRPT prefix (up to the cap) of the
    requests whose context is <= m. Running S for a step delays every one of the N requests in
    the system by its step time s(S) and moves each member one step nearer its end (worth about
    one full-batch step s_full each), so the policy runs the S_m maximising
    ``theta * |S_m| * s_full - N * s(S_m)``. Requests that waited (paused or queued) longer than
    ``guard_s`` are always in (they raise the floor of m): no starvation past ``guard_s``."""
    a = cost.decode_s_base
    per_seq, per_ctx = cost.decode_s_per_seq, cost.decode_s_per_ctx_token
    padded = cost.padded_context

    def step_s(members):
        b = len(members)
        ctx = b * max(j.ctx for j in members) if padded else sum(j.ctx for j in members)
        return a + per_seq * b + per_ctx * ctx

    def choose(t, active, running, cap):
        order = sorted(active, key=lambda j: (rem(j), j.state != RUNNING, j.arrival))
        forced = [j for j in order if j.state != RUNNING and t - j.last_run > guard_s][:cap]
        floor = max((j.ctx for j in forced), default=0)
        full = order[:cap]
        s_full = step_s(full)
        n = len(active)
        best, best_set = -math.inf, full
        for m in sorted({j.ctx for j in active if j.ctx >= floor}):
            members = list(forced)
            for j in order:
                if len(members) >= cap:
                    break
                if j.ctx <= m and j not in forced:
                    members.append(j)
            if not members:
                continue
            value = theta * len(members) * s_full - n * step_s(members)
            if value > best:
                best, best_set = value, members
        return best_set

    return Policy(name, choose, preemptive=True, recheck=recheck)


# ------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------


def base_workload(args):
    """serve-bench's workload for these flags (as sim_ceiling.py builds it) with SmolLM2's
    lengths (replayed as the simulator runs them)."""
    from rtlm_adapt.cli.arguments import load_samples
    from rtlm_adapt.serve_bench import workload_from_args
    from rtlm_adapt.sim_fidelity import replay_length

    samples, _ = load_samples(args)
    workload = workload_from_args(args, samples, StepCost.load(args.profile))
    if args.lengths_from:
        payload = json.loads(Path(args.lengths_from).read_text())
        first = next(iter(payload["policies"].values()))
        lengths = {r["id"]: r["output_tokens"] for r in first["requests"]}
    else:
        lengths = {str(k): int(v) for k, v in json.loads(Path(args.lengths).read_text()).items()}

    def replayed(rid: str) -> int:
        return replay_length(Completion(rid, lengths[rid], 0.0, 0.0, 0.0, "x"), args.max_tokens)

    requests = [
        dataclasses.replace(r, metadata={**r.metadata, TRUE_LENGTH_KEY: replayed(r.id)})
        for r in workload.requests
    ]
    return dataclasses.replace(workload, requests=requests), lengths


def variant(workload, n: int, seed: int, resample: bool):
    """The workload's requests with Poisson arrivals redrawn (seed) at its rate; with
    ``resample``, ``n`` requests drawn with replacement from its (prompt, length) pairs."""
    from rtlm_adapt.data import make_arrivals

    base = workload.requests
    if resample:
        rng = np.random.default_rng(10_000 + seed)
        picks = [base[i] for i in rng.choice(len(base), size=n, replace=True)]
    else:
        picks = list(base)
    times = make_arrivals("poisson", len(picks), workload.rate_rps, seed)
    if not resample and seed == 0:  # serve-bench's own arrivals
        return list(base)
    return [
        dataclasses.replace(r, id=str(i), arrival_time=float(tt), deadline=None)
        for i, (r, tt) in enumerate(zip(picks, sorted(times), strict=True))
    ]


def capacity(requests, cost: StepCost, membership: Membership) -> float:
    """Requests per second FCFS serves when all of ``requests`` arrive at once (full batches,
    padded attention and membership costs included): the load's denominator."""
    jobs = [dataclasses.replace(j, arrival=0.0) for j in to_jobs(requests)]
    fcfs = non_preemptive("fcfs", lambda j: int(j.id))
    return simulate(jobs, cost, fcfs, membership=membership)["throughput_rps"]


def rearrive(requests, rate: float, seed: int):
    """The same requests with Poisson arrivals at ``rate`` (seed)."""
    from rtlm_adapt.data import make_arrivals

    times = sorted(make_arrivals("poisson", len(requests), rate, seed))
    return [dataclasses.replace(r, arrival_time=float(t)) for r, t in zip(requests, times,
                                                                        strict=True)]


def to_jobs(requests, preds: dict[str, float] | None = None) -> list[Job]:
    return [
        Job(
            r.id,
            r.arrival_time,
            r.prompt_tokens or 64,
            max(1, min(r.true_output_tokens, r.max_tokens)),
            pred=(preds or {}).get(r.id, math.nan),
        )
        for r in requests
    ]


def noisy_predictions(jobs: list[Job], tau_target: float, seed: int) -> tuple[dict, float, float]:
    """A log-normal noisy predictor: pred = length * exp(sigma * z), sigma set so that
    Kendall's tau against the true lengths is ~tau_target (on these jobs, this seed)."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    z = rng.standard_normal(len(jobs))
    true = np.array([j.target for j in jobs], dtype=float)
    best = None
    for sigma in np.linspace(0.05, 3.0, 119):
        pred = true * np.exp(sigma * z)
        tau = kendalltau(pred, true).statistic
        if best is None or abs(tau - tau_target) < abs(best[1] - tau_target):
            best = (sigma, tau, pred)
    sigma, tau, pred = best
    return {j.id: float(p) for j, p in zip(jobs, pred, strict=True)}, float(sigma), float(tau)


def residual_fn(lengths: Sequence[int]) -> Callable[[int], float]:
    """E[L - g | L > g] over the workload's length distribution (1 past the longest)."""
    arr = np.sort(np.asarray(lengths, dtype=float))
    suffix = np.cumsum(arr[::-1])[::-1]  # suffix[i] = sum(arr[i:])
    cache: dict[int, float] = {}

    def f(g: int) -> float:
        if g not in cache:
            i = int(np.searchsorted(arr, g, side="right"))
            cache[g] = max(1.0, suffix[i] / (len(arr) - i) - g) if i < len(arr) else 1.0
        return cache[g]

    return f


# ------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------


def library_check(requests, cost: StepCost, jobs: list[Job], membership: Membership) -> dict:
    """The library's simulator vs this one, non-preemptive: FCFS and oracle SJF mean RT."""
    from rtlm_adapt.experiment import Workload, run_policy

    wl = Workload(list(requests), 0.0, 0.0, 1.0, 0.0, "check")
    fcfs = non_preemptive("fcfs", lambda j: (j.arrival, int(j.id)))
    sjf = non_preemptive(
        "sjf", lambda j: (cost.isolated_service_time(j.prompt, j.target), j.arrival)
    )
    out = {}
    for lib_name, mine in (("fcfs", fcfs), ("oracle-sjf", sjf)):
        lib = run_policy(lib_name, wl, primary_cost=cost, secondary_cost=None)
        ours = simulate(jobs, cost, mine, membership=membership)
        out[lib_name] = {
            "library_mean_rt_s": lib.summary.mean_rt_s,
            "ours_mean_rt_s": ours["mean_rt_s"],
            "ratio": ours["mean_rt_s"] / lib.summary.mean_rt_s,
            "library_p99_s": lib.summary.p99_rt_s,
            "ours_p99_s": ours["p99_rt_s"],
        }
    return out


def policies_for(cost: StepCost, jobs: list[Job], args) -> list[tuple[Policy, str]]:
    """(policy, preemption mode) pairs; non-preemptive ones run once (mode 'none')."""
    residual = residual_fn([j.target for j in jobs])
    oracle = remaining_fn("oracle", residual)
    pred = remaining_fn("pred", residual)
    finals = sorted(j.prompt + j.target for j in jobs)
    median_final = finals[len(finals) // 2]
    mean_svc = float(np.mean([cost.isolated_service_time(j.prompt, j.target) for j in jobs]))

    def long_oracle(j):
        return j.prompt + j.target > median_final

    out: list[tuple[Policy, str]] = [
        (non_preemptive("fcfs", lambda j: (j.arrival, j.id)), "none"),
        (
            non_preemptive(
                "sjf", lambda j: (cost.isolated_service_time(j.prompt, j.target), j.arrival)
            ),
            "none",
        ),
        (non_preemptive("sjf-pred", lambda j: (j.pred, j.arrival)), "none"),
    ]
    for mode in ("pause", "recompute"):
        rc = args.recheck if mode == "pause" else None
        pols = [
            srpt("srpt", oracle, recheck=rc),
            srpt("srpt-c12", oracle, eff_cap=12, recheck=rc),
            srpt("srpt-c8", oracle, eff_cap=8, recheck=rc),
            srpt("srpt-long8", oracle, max_long=8, is_long=long_oracle, recheck=rc),
            srpt("srpt-long4", oracle, max_long=4, is_long=long_oracle, recheck=rc),
            wsrpt("wsrpt", oracle, cost, recheck=rc),
            marginal("mc1", oracle, cost, theta=1.0, recheck=rc),
            marginal("mc2", oracle, cost, theta=2.0, recheck=rc),
            marginal("mc1-guard", oracle, cost, theta=1.0, guard_s=mean_svc, recheck=rc),
            srpt("srpt-pred", pred, recheck=rc),
            srpt("srpt-c12-pred", pred, eff_cap=12, recheck=rc),
            marginal("mc1-guard-pred", pred, cost, theta=1.0, guard_s=mean_svc, recheck=rc),
        ]
        out += [(p, mode) for p in pols]
    return out


def run_setting(label: str, requests, cost: StepCost, membership: Membership, args) -> dict:
    jobs = to_jobs(requests)
    preds, sigma, tau = noisy_predictions(jobs, args.tau, seed=args.pred_seed)
    jobs = to_jobs(requests, preds)
    rows = {}
    for policy, mode in policies_for(cost, jobs, args):
        key = policy.name if mode == "none" else f"{policy.name}/{mode}"
        r = simulate(jobs, cost, policy, mode="pause" if mode == "none" else mode,
                     membership=membership)
        r.pop("rt")
        rows[key] = r
    if cost.padded_context:
        # not preemption: what an executor without padded attention (ragged / paged) would give
        flat = dataclasses.replace(cost, padded_context=False)
        for policy, mode in policies_for(flat, jobs, args):
            if policy.name in ("fcfs", "srpt") and mode in ("none", "pause"):
                key = policy.name if mode == "none" else f"{policy.name}/{mode}"
                r = simulate(jobs, flat, policy, membership=membership)
                r.pop("rt")
                rows[f"{key} [no padding]"] = r
                r = simulate(jobs, cost, policy, membership=membership, buckets=True)
                r.pop("rt")
                rows[f"{key} [2 buckets]"] = r
    base = rows["fcfs"]
    for r in rows.values():
        r["mean_x_fcfs"] = r["mean_rt_s"] / base["mean_rt_s"]
        r["p99_x_fcfs"] = r["p99_rt_s"] / base["p99_rt_s"]
        r["tput_x_fcfs"] = r["throughput_rps"] / base["throughput_rps"]
    return {"label": label, "requests": len(jobs), "pred_sigma": sigma, "pred_tau": tau,
            "policies": rows}


def summarise(settings: list[dict]) -> dict:
    """Per policy: the mean (geometric for ratios), min and max of each ratio over settings."""
    out = {}
    names = settings[0]["policies"].keys()
    for name in names:
        agg = {}
        for key in ("mean_x_fcfs", "p99_x_fcfs", "tput_x_fcfs"):
            vals = np.array([s["policies"][name][key] for s in settings])
            agg[key] = {"geomean": float(np.exp(np.log(vals).mean())),
                        "min": float(vals.min()), "max": float(vals.max())}
        agg["preemptions_mean"] = float(np.mean([s["policies"][name]["preemptions"]
                                                 for s in settings]))
        out[name] = agg
    return out


def print_table(title: str, agg: dict, file=sys.stdout) -> None:
    print(f"\n{title}", file=file)
    print(f"{'policy/preemption':28s} {'mean x FCFS':>20s} {'p99 x FCFS':>20s} "
          f"{'tput x FCFS':>20s} {'preempt':>8s}  ok?", file=file)
    for name, a in agg.items():
        def cell(key, a=a):
            v = a[key]
            return f"{v['geomean']:.3f} [{v['min']:.3f},{v['max']:.3f}]"

        ok = (a["mean_x_fcfs"]["geomean"] <= 0.85 and a["p99_x_fcfs"]["geomean"] <= 2.0
              and a["tput_x_fcfs"]["geomean"] >= 0.95)
        print(f"{name:28s} {cell('mean_x_fcfs'):>20s} {cell('p99_x_fcfs'):>20s} "
              f"{cell('tput_x_fcfs'):>20s} {a['preemptions_mean']:8.1f}  "
              f"{'MEETS' if ok else ''}", file=file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="alpaca:gpt4_1106_preview")
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0, help="serve-bench's seed (prompts)")
    parser.add_argument("--arrivals", default="poisson")
    parser.add_argument("--slo", default="0.7:2,0.3:10")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--profile", default=HF_PROFILE, help="workload + sim costs")
    parser.add_argument("--lengths-from", help="serve-bench JSON with per-request records")
    parser.add_argument("--lengths", help="JSON {request id: output tokens}")
    parser.add_argument("--fit-from", default=DEFAULT_FIT_FROM,
                        help="serve-bench JSON whose steps the 'fitted' profile is fitted to")
    parser.add_argument("--fit-policy", default="fcfs")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="arrival seeds, 80 requests")
    parser.add_argument("--resample", type=int, default=1000, help="0: skip")
    parser.add_argument("--resample-seeds", default="0,1")
    parser.add_argument("--resample-load", type=float, default=0.8,
                        help="resampled runs: arrival rate = this x the profile's measured FCFS "
                        "capacity (a burst of the same requests, padded attention included); "
                        "0: serve-bench's rate")
    parser.add_argument("--recheck", type=int, default=16,
                        help="pause mode: re-decide every this many iterations too")
    parser.add_argument("--tau", type=float, default=0.45, help="predictor's Kendall tau")
    parser.add_argument("--pred-seed", type=int, default=0)
    parser.add_argument("--copy-s-per-token", type=float, default=None,
                        help="pause: seconds to copy one context token of a row out or back "
                        "(default: from the -hf profile's leave timings at context 64 vs 512)")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not (args.lengths_from or args.lengths):
        parser.error("give --lengths-from or --lengths")
    started = time.time()

    from rtlm_adapt.calibration.step_fit import fit_step_cost, run_steps

    hf = StepCost.load(HF_PROFILE)
    copy = args.copy_s_per_token
    if copy is None:
        pts = hf.extra["membership_points_s"]
        copy = max(0.0, (pts["b16_ctx512"]["leave"] - pts["b16_ctx64"]["leave"]) / (512 - 64))
    membership = Membership(hf.join_s, hf.leave_s, copy)
    shipped = StepCost.load(args.profile)
    fit_payload = json.loads(Path(args.fit_from).read_text())
    fitted = fit_step_cost(
        run_steps(fit_payload, policy=args.fit_policy, executor="primary", target="cycle"),
        shipped,
        name=f"{shipped.name}-fitted",
        source=f"serve-bench run {args.fit_from}, policy {args.fit_policy}, target cycle",
    )
    profiles = {"hf": shipped, "fitted": fitted}
    workload, _ = base_workload(args)
    print(f"workload: {workload.description}", file=sys.stderr)
    print(f"membership (pause model): {membership}", file=sys.stderr)
    for name, c in profiles.items():
        print(f"profile {name}: base {c.decode_s_base:.4f} per_seq {c.decode_s_per_seq:.5f} "
              f"per_ctx {c.decode_s_per_ctx_token:.3g} prefill {c.prefill_s_base:.3f}+"
              f"{c.prefill_s_per_token:.4f}/tok join {c.join_s:.4f} leave {c.leave_s:.4f}",
              file=sys.stderr)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rseeds = [int(s) for s in args.resample_seeds.split(",") if s.strip()]
    variants = [(f"{args.requests} req, arrival seed {s}", variant(workload, 0, s, False), False)
                for s in seeds]
    if args.resample:
        variants += [(f"{args.resample} req resampled, seed {s}",
                      variant(workload, args.resample, s, True), True) for s in rseeds]

    checks = {}
    results: dict[str, dict[str, list]] = {p: {"small": [], "large": []} for p in profiles}
    for pname, cost in profiles.items():
        for label, requests, large in variants:
            cap_rps = capacity(requests, cost, membership)
            rate = len(requests) / (max(r.arrival_time for r in requests)
                                    - min(r.arrival_time for r in requests))
            if large and args.resample_load:
                requests = rearrive(requests, args.resample_load * cap_rps,
                                    int(label.rsplit(" ", 1)[1]))
                label = f"{label}, load {args.resample_load} of capacity"
                rate = args.resample_load * cap_rps
            if not args.no_check and (not large or label.endswith("seed 0")):
                chk = library_check(requests, cost, to_jobs(requests), membership)
                checks[f"{pname}: {label}"] = chk
                print(f"check {pname:6s} {label:28s} " + "  ".join(
                    f"{k}: ours/library {v['ratio']:.4f} ({v['ours_mean_rt_s']:.2f}s vs "
                    f"{v['library_mean_rt_s']:.2f}s)" for k, v in chk.items()), flush=True)
            t0 = time.time()
            res = run_setting(label, requests, cost, membership, args)
            res["capacity_rps"] = cap_rps
            res["realised_load"] = rate / cap_rps
            f = res["policies"]["fcfs"]
            print(f"  {pname} {label}: FCFS mean {f['mean_rt_s']:.1f}s p99 {f['p99_rt_s']:.1f}s "
                  f"realised load {rate / cap_rps:.2f} mean batch {f['mean_batch']:.1f}; predictor "
                  f"tau {res['pred_tau']:.2f}; {time.time() - t0:.1f}s", flush=True)
            results[pname]["large" if large else "small"].append(res)

    tables = {}
    for pname in profiles:
        for size in ("small", "large"):
            settings = results[pname][size]
            if not settings:
                continue
            agg = summarise(settings)
            n = settings[0]["requests"]
            title = (f"profile {pname}, max_tokens {args.max_tokens}, load {args.load}, "
                     f"{n} requests x {len(settings)} arrival seeds "
                     "(geomean [min,max] of ratios to FCFS on the same arrivals)")
            print_table(title, agg)
            tables[f"{pname}/{size}"] = {"title": title, "summary": agg}
    print(f"\n{time.time() - started:.0f}s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args),
            "workload": workload.description,
            "membership": dataclasses.asdict(membership),
            "profiles": {k: dataclasses.asdict(v) for k, v in profiles.items()},
            "library_check": checks,
            "tables": tables,
            "settings": results,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
