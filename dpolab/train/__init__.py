"""Training: one explicit loop for the DPO family, SFT and KL-SFT (see ``loop.py`` for the pseudocode).

from dpolab.train import TrainConfig, train
result = train(model, tokenizer, load_penn()["train"], TrainConfig(loss="dpop", loss_kwargs={"dpop_lambda": 5}))
result.history[-1]["rewards/margins"]
result = train(model, tokenizer, penn_rankings(load_penn()["train"]), TrainConfig(loss="plackett_luce"))  # rankings
result.history[-1]["ranking/kendall_tau"]                                   # columns: listwise_metrics(K)
"""

from .adapters import merge_adapter
from .config import Speedups, TrainConfig
from .listwise import listwise_metrics
from .loop import EVAL_METRICS, METRICS, NonFiniteError, TrainResult, train

__all__ = [
    "TrainConfig",
    "Speedups",
    "train",
    "TrainResult",
    "NonFiniteError",
    "METRICS",
    "EVAL_METRICS",
    "listwise_metrics",
    "merge_adapter",
]
