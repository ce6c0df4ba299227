"""Calibration: what one executor step costs, measured and fitted.

- :mod:`~rtlm_adapt.calibration.step_cost`: :class:`StepCost`, the linear cost model of one
  executor iteration and its JSON profile format; the simulator and the latency model use it.
- :mod:`~rtlm_adapt.calibration.profiler`: measures a real executor on synthetic inputs and fits
  a StepCost to it (``rtlm-adapt profile``).
- :mod:`~rtlm_adapt.calibration.step_fit`: fits a StepCost to the steps a serve-bench run
  recorded (``rtlm-adapt profile --from-run``).
- ``profiles/``: the packaged profiles (package data), loaded by name with
  :meth:`StepCost.load`.
"""

from rtlm_adapt.calibration.step_cost import StepCost

__all__ = ["StepCost"]
