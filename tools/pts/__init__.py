"""Pivotal Token Search: single-token DPO pairs at the tokens of sampled answers that swing the
probability of success (`search`: Algorithm 1; `pairs`: the pair records; `rollouts`: the
estimator over a phijax Sampler and the question oracles)."""
from tools.pts.pairs import pair_tokens, pts
from tools.pts.rollouts import SamplerEstimator, check_prompts, run_pts
from tools.pts.search import (Job, Pivot, PTSConfig, Rollouts, Stats, find_pivots, search,
                              split_point, subdivide)
