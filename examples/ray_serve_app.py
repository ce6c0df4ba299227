"""rtlm-adapt on Ray Serve, on one machine: start Ray, deploy, send a few requests, shut down.

    pip install -e ".[ray]"
    python examples/ray_serve_app.py            # prints which replica served each request

The same application for ``serve run`` (``app`` below, or the YAML config beside this file)::

    serve run examples.ray_serve_app:app
    serve run examples/ray_serve_config.yaml

Two paced engine replicas (a stand-in for vLLM: K slots, a priority queue) sit behind
``LengthAwareRouter``; the ingress predicts every request's output length, keys and flags it,
and teaches the shared learner from each answer. Requests predicted at or above 300 tokens go to
the long replica.
"""

from __future__ import annotations

import os
import tempfile

from rtlm_adapt.integrations.ray_serve import build_app

SETTINGS = {
    "engine_replicas": 2,
    "slots": 2,
    "tokens_per_s": 500.0,
    "long_replicas": 1,
    "offload_threshold": 300.0,
    "engine_cpus": 0.25,
}
app = build_app(SETTINGS)


def main() -> None:
    import httpx
    import ray
    from ray import serve

    scratch = tempfile.mkdtemp(prefix="rtlm-ray-example-")
    os.environ.setdefault("RAY_TMPDIR", scratch)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    try:
        serve.run(app, name="rtlm", route_prefix="/")
        prompts = [
            "Name one prime number.",
            "Write a detailed essay on the history of the printing press in Europe.",
            "What is 2 + 2?",
            "Explain step by step how a compiler turns source code into machine code.",
        ]
        with httpx.Client(base_url="http://127.0.0.1:8123", timeout=60) as client:
            for prompt in prompts:
                reply = client.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 50},
                )
                h = reply.headers
                print(
                    f"{reply.status_code} replica={h['x-rtlm-replica']} "
                    f"predicted={h['x-rtlm-predicted-tokens']} long={h['x-rtlm-offload']}  "
                    f"{prompt[:50]}"
                )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
