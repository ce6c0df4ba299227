"""Study: where a gateway policy's real vLLM run and its replay on the engine model part.

Reads a ``serve-bench --engine vllm --compare-sim`` JSON, rebuilds the run's requests (as
``_vllm_run.rebuild_run``), replays one policy's first repeat on the engine model with each
request's real length, and prints:

1. per length bin (quantiles of the real lengths): mean response time and time to first token,
   real and replayed, and the engine's pace (ms per token after the first) in both: a gap in the
   waits with equal paces is an ordering difference, not an engine one;
2. the predictions: the gateway's own (``gateway_answers``, runs from session 11 on) against an
   emulation of its predictor (predict at each arrival, learn at each real finish) and against
   the same emulation learning at the replay's finishes;
3. the priority keys the gateway sent (``priority`` = key in ms): with the heuristic's knobs
   (``key = (1 + 0.5 u) x service_s + 0.05 x arrival``), ``key - 0.05 x arrival`` against the
   emulated ``(1 + 0.5 u) x service_s``, per half of the run. A slope far from 1 says the live
   latency model's service times are on another scale than the replay's, which shifts the
   balance between length and aging;
4. the time from the gateway's admission to the first token, real and replayed: beyond the
   prefill step, the real one holds the gateway-to-vLLM round trip, during which the seat that
   freed stays empty unless vLLM's own queue holds a request (``--max-inflight`` above the seats).

    python benchmarks/studies/gateway_vs_replay.py benchmarks/results/RUN.json heuristic
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _vllm_run import rebuild_run
from scipy.stats import kendalltau, spearmanr

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.engines.vllm_replay import (
    engine_profile,
    replay,
    replay_requests,
    template_in_prompts,
)
from rtlm_adapt.request import Completion, Request

WAIT_WEIGHT, UNCERTAINTY_WEIGHT = 0.05, 0.5  # the heuristic's knobs (policies/heuristic.py)


def completions(rows: list[list]) -> list[Completion]:
    """A JSON ``completions`` repeat as Completion records (older runs: 5 or 6 fields)."""
    out = []
    for r in rows:
        start = r[6] if len(r) > 6 else r[2]
        error = r[5] if len(r) > 5 else None
        out.append(Completion(r[0], r[1], r[2], start, r[4], "vllm", first_token_time=r[3],
                              error=error))  # fmt: skip
    return out


def emulate(reals, prompts, finishes, profile):
    """The gateway's predictor and keys, predicting at each arrival and learning at each finish
    in ``finishes`` (request id -> time): per request (predicted tokens, uncertainty, service_s).
    """
    ctl = AdaptiveController("sjf", profiles={"primary": profile})
    tokens = {c.request_id: c.output_tokens for c in reals}
    events = [(c.arrival_time, 0, c.request_id) for c in reals]
    events += [(t, 1, rid) for rid, t in finishes.items()]
    out, features = {}, {}
    for t, kind, rid in sorted(events):
        if kind == 0:
            ctl.submit(Request(rid, prompts[rid], arrival_time=t))
            live = ctl.entry(rid)
            out[rid] = (live.prediction.length, live.uncertainty, live.service_s)
            features[rid] = live.features
            ctl.withdraw(rid, "cancelled")
        else:
            ctl.predictor.learn_one(features[rid], tokens[rid])
    return out


def main() -> None:
    path, policy = sys.argv[1], sys.argv[2]
    real = json.load(open(path))
    chosen, _, requests = rebuild_run(real)
    prompts = {r.id: r.prompt for r in requests}
    kv = real.get("kv_cache") or {}
    cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"),
                          max_num_seqs=real["max_num_seqs"], max_inflight=real.get("max_inflight"),
                          kv_blocks=kv.get("blocks"),
                          block_size=kv.get("block_size"))  # fmt: skip
    cost, template = template_in_prompts(cost)
    reals = [c for c in completions(real["completions"][policy][0]) if c.error is None]
    replayed = replay_requests(
        [r.id for r in requests], [r.prompt for r in requests],
        [s.prompt_tokens + template for s in chosen], [r.arrival_s for r in requests],
        [r.deadline_s for r in requests], reals,
    )  # fmt: skip
    sim = {c.request_id: c for c in replay(policy, replayed, cost).completions}

    print(f"{path}, {policy}, repeat 1 ({len(reals)} requests)")
    lengths = np.array([c.output_tokens for c in reals])
    rt = np.array([[c.response_time, sim[c.request_id].response_time] for c in reals])
    ttft = np.array([[c.first_token_time - c.arrival_time,
                      sim[c.request_id].first_token_time - sim[c.request_id].arrival_time]
                     for c in reals])  # fmt: skip
    pace = (rt - ttft) / np.maximum(1, lengths - 1)[:, None] * 1000
    print("1. length bin      n   RT real  RT sim  TTFT real  TTFT sim  ms/tok real  sim")
    edges = np.quantile(lengths, [0, 0.25, 0.5, 0.75, 0.9, 1.0])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (lengths >= lo) & (lengths <= hi)
        print(f"   {lo:4.0f}-{hi:4.0f}  {m.sum():4d}  {rt[m, 0].mean():7.2f} {rt[m, 1].mean():7.2f}"
              f"  {ttft[m, 0].mean():9.2f} {ttft[m, 1].mean():9.2f}"
              f"  {pace[m, 0].mean():11.1f} {pace[m, 1].mean():4.1f}")  # fmt: skip
    print(f"   all        {len(reals):4d}  {rt[:, 0].mean():7.2f} {rt[:, 1].mean():7.2f}"
          f"  {ttft[:, 0].mean():9.2f} {ttft[:, 1].mean():9.2f}")  # fmt: skip

    prior = StepCost.load("http-engine-prior").with_max_batch(real["max_num_seqs"])
    live_order = emulate(reals, prompts, {c.request_id: c.finish_time for c in reals}, prior)
    sim_order = emulate(reals, prompts, {i: c.finish_time for i, c in sim.items()}, prior)
    ids = [c.request_id for c in reals]
    truth = lengths.astype(float)
    a = np.array([live_order[i][0] for i in ids])
    b = np.array([sim_order[i][0] for i in ids])
    print("2. predictions (Kendall tau against the real lengths)")
    print(f"   emulated, learning at the real finishes:   tau {kendalltau(a, truth)[0]:.3f}")
    print(f"   emulated, learning at the replay finishes: tau {kendalltau(b, truth)[0]:.3f}"
          f" (Spearman with the first {spearmanr(a, b)[0]:.3f})")  # fmt: skip
    answers = real.get("gateway_answers", {}).get(policy)
    if not answers:
        print("   (no gateway_answers in this run: recorded from session 11 on)")
        return
    decided = {row[0]: row[1:] for row in answers[0]}
    g = np.array([decided[i][0] for i in ids])
    print(f"   the gateway's own:                         tau {kendalltau(g, truth)[0]:.3f}"
          f" (Spearman with the emulation {spearmanr(g, a)[0]:.3f},"
          f" mean ratio {np.mean(g / a):.3f})")  # fmt: skip

    arrival = np.array([c.arrival_time for c in reals])
    key = np.array([decided[i][1] / 1000 for i in ids])
    emulated = np.array([(1 + UNCERTAINTY_WEIGHT * live_order[i][1]) * live_order[i][2]
                         for i in ids])  # fmt: skip
    length_part = key - WAIT_WEIGHT * arrival
    print("3. the live key's length part against the emulated one (least-squares slope)")
    order = np.argsort(arrival)
    for name, part in (("first half", order[: len(order) // 2]),
                       ("second half", order[len(order) // 2 :])):  # fmt: skip
        x, y = emulated[part], length_part[part]
        slope = np.polyfit(x, y, 1)[0]
        service = np.median([live_order[ids[j]][2] for j in part])
        print(
            f"   {name}: slope {slope:.3f}, Spearman {spearmanr(x, y)[0]:.3f},"
            f" emulated service_s median {service:.2f} s"
        )
    handoff = [c.first_token_time - c.start_time for c in reals]
    sim_handoff = [sim[c.request_id].first_token_time - sim[c.request_id].start_time for c in reals]
    ms = {name: np.quantile(values, [0.5, 0.9]) * 1000
          for name, values in (("real", handoff), ("replayed", sim_handoff))}  # fmt: skip
    print(
        f"4. admission to first token (ms, median / p90): real {ms['real'][0]:.0f} /"
        f" {ms['real'][1]:.0f}, replayed {ms['replayed'][0]:.0f} / {ms['replayed'][1]:.0f}"
    )
    queue = np.array([decided[i][2] / 1000 for i in ids])
    print(
        f"   gateway queue wait: mean {queue.mean():.2f} s real,"
        f" {np.mean([sim[i].start_time - sim[i].arrival_time for i in ids]):.2f} s replayed"
    )


if __name__ == "__main__":
    main()
