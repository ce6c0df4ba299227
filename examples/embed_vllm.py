"""The controller around vLLM in your own process: it picks who joins vLLM's batch, and when.

Run: python examples/embed_vllm.py   (needs the [vllm] extra; about 30 s to start on a CPU)
"""

# fmt: off
import time

from rtlm_adapt import Request
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.engines.vllm_executor import VLLMExecutor
from rtlm_adapt.serving import ExecutorState

prompts = ["Name one prime number.", "Write a detailed essay on the history of Rome.",
           "Translate 'cat' into French.", "Explain, step by step, how a transformer works.",
           "Say yes.", "List ten European capitals and describe each one."]

if __name__ == "__main__":  # vLLM starts its worker with spawn
    with VLLMExecutor.from_model("smollm2", max_num_seqs=2) as engine:
        controller = AdaptiveController(policy="heuristic")  # or "fcfs", "ppo:model.zip", ...
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            controller.submit(Request(f"r{i}", prompt, arrival_time=0.0, max_tokens=64))
        while len(controller) or engine.running():
            now = time.perf_counter() - start
            state = ExecutorState("vllm", "primary", engine.running(), engine.max_batch_size, now)
            engine.admit(controller.next_batch(state), now)  # shortest predicted first
            result = engine.step(now)  # one vLLM iteration
            controller.on_step("vllm", result)  # vLLM's step times teach the latency model
            for done in result.finished:  # real lengths teach the length predictor
                controller.on_finish(done)
                print(f"{done.request_id}: {done.output_tokens} tokens in "
                      f"{done.response_time:.2f} s: {done.text[:40]!r}")
        print(controller.stats())
