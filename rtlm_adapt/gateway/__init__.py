"""The OpenAI-compatible scheduling gateway (``rtlm-adapt serve``), needs the ``[gateway]`` extra.

Clients (the openai SDK, curl) talk to the gateway as they would to vLLM; the gateway predicts
each request's output length at arrival, queues it in an
:class:`~rtlm_adapt.controller.AdaptiveController`, admits it to a backend when one has a free
in-flight slot (routing by least predicted outstanding work, offloading long or uncertain
requests to a secondary pool), sets vLLM's ``priority`` from the controller's key, and learns
from the ``usage`` of every answer.

- :mod:`~rtlm_adapt.gateway.config`: the settings (flags or a TOML file);
- :mod:`~rtlm_adapt.gateway.dispatcher`: queue to backend slots, request ends;
- :mod:`~rtlm_adapt.gateway.proxy`: upstream calls, retries, stream relay;
- :mod:`~rtlm_adapt.gateway.app`: the FastAPI app; :mod:`~rtlm_adapt.gateway.metrics`: Prometheus.
"""
