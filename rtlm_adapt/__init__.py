"""rtlm-adapt: uncertainty-aware, online-learning scheduling for real-time LM serving.

Importing this package stays light: no torch, transformers or stable-baselines3.
"""

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.request import TRUE_LENGTH_KEY, Completion, Request

__all__ = ["Completion", "Knobs", "Request", "TRUE_LENGTH_KEY"]
__version__ = "0.1.0"
