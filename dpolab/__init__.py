"""dpolab: Direct Preference Optimization from first principles — a notebook course and a lean PyTorch library.

Modules (see README for the map): ``theory`` (closed forms), ``derivations`` (sympy), ``logprobs``
(sequence log-probs), ``losses`` (the loss registry), ``data`` (preference data and the Penn set).
"""

__version__ = "0.2.0"
