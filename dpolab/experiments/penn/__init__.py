"""The GPT-2 Penn experiment (``make penn``, ``python -m dpolab.experiments.penn --help``).

config.py        the settings: one frozen dataclass per concern, the article's defaults
methods.py       METHODS (name -> spec), units, ODPO's offsets, training with dpolab.train
trl_baseline.py  the baseline through TRL's own DPOTrainer
evaluate.py      per-prompt metrics of a policy's samples, bootstrap intervals, pooling over seeds
pipeline.py      the run from start to end, resumable; timings per phase
figures.py       the PNG figures, from the run folder's files
report.py        report.md: our numbers beside the article's, the discussion phrased from the numbers
cli.py           the command line

from dpolab.experiments.penn import main
main(["--quick", "--output-dir", "runs/smoke"])     # exit status: 0 done, 2 bad input, 1 failed later
"""

from .cli import build_parser, experiment_from_args, main
from .config import Experiment, FrontierConfig, Hyper, RunConfig, TRLSettings
from .methods import METHODS
from .pipeline import InputError, run

__all__ = [
    "main",
    "run",
    "build_parser",
    "experiment_from_args",
    "Experiment",
    "RunConfig",
    "Hyper",
    "TRLSettings",
    "FrontierConfig",
    "METHODS",
    "InputError",
]
