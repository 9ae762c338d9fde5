"""Evaluation at scale: sample an evaluation set (``emag sample``), score it (``emag score``).

docs/eval.md describes the protocols, the folder format and how runs are sharded and resumed.
"""

from .distributed import Ranks, process_group
from .folder import FolderError, SampleFolder
from .protocols import PROTOCOLS, EvalSet, eval_set
from .sampling import SamplingPlan, SamplingSummary, plan_sampling, run_sampling
from .seeds import sample_generators, sample_seed

__all__ = ["PROTOCOLS", "EvalSet", "FolderError", "Ranks", "SampleFolder", "SamplingPlan", "SamplingSummary",
           "eval_set", "plan_sampling", "process_group", "run_sampling", "sample_generators", "sample_seed"]
