"""A reward drawn at random, for the benchmarks' GRPO runs (REWARD=bench/random_reward.py:uniform).

A benchmark times run_train_grpo.py's step on a random model, or on forced completions of random
tokens: under a text reward every completion of a group would score the same (a random model's text
decodes to empty strings), every group would have zero advantage and GRPO would drop them all, so the
policy pass would never run. Drawn uniformly, two rewards of a group tie with probability 0: every
group keeps a non-zero advantage and none is dropped. Seeded: two runs (the packed and the padded
layout) draw the same rewards in the same order.
"""

import random

SEED = 0  # the rewards' random source

_generator = random.Random(SEED)


def uniform(completion: str, **row) -> dict:
    """A reward uniform in [0, 1), whatever the completion; correct when it is at least 1/2 (so that the
    logged accuracy is a number, not a reading of the text)."""
    value = _generator.random()
    return {"reward": value, "correct": value >= 0.5}
