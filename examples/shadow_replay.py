"""What would another policy have done with the traffic you just served? Record it, replay it.

The controller keeps a log of the requests it accepts (their predictions, and the tokens each
really generated); ``replay`` serves that log again in virtual time under any policy, on
executors that cost what the controller's latency models learned. The shadow guard of a
learned policy does this every 50 arrivals; here it is by hand, after a simulated run.

Run: python examples/shadow_replay.py
"""

from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.data.datasets import load_prompts
from rtlm_adapt.experiment import build_workload, run_policy
from rtlm_adapt.policies import make_policy
from rtlm_adapt.serving import StepCost
from rtlm_adapt.shadow import ShadowSetup, replay
from rtlm_adapt.traffic import TrafficLog

# 1. serve 300 real prompts (AlpacaEval, their real answer lengths) under FCFS, logging them
workload = build_workload(load_prompts("alpaca:gpt4_1106_preview"), arrivals="azure-conv",
                          load=0.9, n=300, seed=0)
log = TrafficLog(capacity=300)


def logging_controller(policy, **kwargs):
    controller = AdaptiveController(policy, **kwargs)
    controller.watch_traffic(log)  # what a shadow guard asks for when it is attached
    return controller


served = run_policy("fcfs", workload, secondary_cost=StepCost.default_secondary(),
                    controller_factory=logging_controller)
print(f"served under fcfs: mean response time {served.summary.mean_rt_s:.1f} s")

# 2. the same requests again, under each policy, on the executors as the controller knows them
setup = ShadowSetup.of(served.controller)
for name in ("fcfs", "heuristic", "ppo-unguarded"):
    again = replay(log.window(), make_policy(name), setup)
    print(f"replayed under {name}: mean response time {again.mean_response_s:.1f} s")
