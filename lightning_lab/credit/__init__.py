"""Credit assignment: turn trajectory rewards into per-transition returns and advantages.

Each strategy lives in its own file as a small pure function plus a thin registered class with an
``assign(batch)`` method that fills ``Transition.ret`` / ``Transition.advantage`` in place. Swapping
strategies on a collected batch costs only this arithmetic, never new rollouts.
"""

from .registry import CreditStrategy, get, names, param_names, register
from .baselines import BASELINES, apply_baseline
from .uniform import Uniform, uniform_returns
from .discounted import Discounted, discounted_returns
from .value import ValueCredit, gae

__all__ = ["CreditStrategy", "get", "names", "param_names", "register", "BASELINES", "apply_baseline",
           "Uniform", "uniform_returns", "Discounted", "discounted_returns", "ValueCredit", "gae"]
