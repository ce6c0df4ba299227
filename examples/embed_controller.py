"""Embed AdaptiveController in your own serving loop (here: a simulated engine on virtual time).

Run: python examples/embed_controller.py
"""

# fmt: off
from rtlm_adapt import Request
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.serving import ExecutorState, StepCost
from rtlm_adapt.serving.sim import SimulatedExecutor

prompts = ["Name one prime number.", "Write a detailed essay on the history of Rome.",
           "Translate 'cat' into French.", "Explain, step by step, how a transformer works."]
engine = SimulatedExecutor("gpu", StepCost.default())  # your engine: admit() + step()
controller = AdaptiveController(policy="heuristic")  # or "fcfs", "ppo:model.zip", ...

now = 0.0
for i, prompt in enumerate(prompts):  # true lengths only drive the simulated engine
    controller.submit(Request(f"r{i}", prompt, arrival_time=now, deadline=now + 60.0,
                              metadata={"true_output_tokens": 20 + 150 * (i % 2)}))
while len(controller) or engine.running():
    state = ExecutorState("gpu", "primary", engine.running(), engine.max_batch_size, now)
    engine.admit(controller.next_batch(state), now)  # the controller picks who joins the batch
    result = engine.step(now)  # one (fused) decode step of the running batch
    now += result.duration_s
    controller.on_step("gpu", result)  # timings teach the latency model
    for done in result.finished:  # true lengths teach the length predictor
        controller.on_finish(done)
        print(f"{done.request_id}: {done.output_tokens} tokens, {done.response_time:.2f}s")
print(controller.stats())
