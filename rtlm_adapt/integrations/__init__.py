"""Integrations with distributed serving engines (each behind its own extra).

- :mod:`~rtlm_adapt.integrations.routing`: length-aware replica choice as plain Python (the
  bookkeeping of predicted work per replica and the ranking), no Ray needed;
- :mod:`~rtlm_adapt.integrations.paced_engine`: an engine-like stand-in (K slots, a priority
  queue, paced tokens) for routing experiments, no Ray needed;
- :mod:`~rtlm_adapt.integrations.learner`: the shared learner (one predictor, a journal and
  snapshots on disk), no Ray needed;
- :mod:`~rtlm_adapt.integrations.ray_router`: ``LengthAwareRouter``, a Ray Serve request router
  (``[ray]`` extra);
- :mod:`~rtlm_adapt.integrations.ray_serve`: the ingress, engine and learner deployments and
  ``build_app`` for ``serve run`` (``[ray]`` extra).

Importing this package imports none of them, so ``import rtlm_adapt`` never imports Ray.
"""
