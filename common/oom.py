"""Out-of-memory never ends a run: a phase that runs out of GPU memory is done again at half its size.

The trainers run three kinds of phase whose memory grows with a size the user sets: the rollouts
(GENERATION_BATCH_SIZE rows sampled together), an eval batch (EVAL_BATCH_SIZE prompts) and an update
(its micro-batches of MICRO_BATCH_SIZE sequences, or MICRO_BATCH_TOKENS tokens). A long sample can
push any of them past the card at step 120 of a run that fitted at step 1, the most common complaint
about GRPO on 12-24 GB cards. A script writes such a phase as

    for attempt in sizes.attempts("MICRO_BATCH_SIZE", "the policy pass"):
        with attempt:
            ...  # the phase from its start, at attempt.size

and a torch.OutOfMemoryError inside it (torch.cuda.OutOfMemoryError is the same class) ends the
attempt: what the phase held is freed (its tensors die with the error's frames; then the sampler's
static KV buffers, a garbage collection and, on CUDA, the caching allocator's free blocks:
torch.cuda.empty_cache, as PyTorch's FAQ "My out of memory exception handler can't allocate memory"
advises, outside the except clause), the size is halved for the rest of the run, one line says so,
the generators named in ``rewind`` go back to their state at the phase's start, and the phase runs
again from its start. At size 1 the error is raised: there is nothing smaller to try.

What a retry repeats is the script's to say (it zeroes the gradients at an update's start, so an
update redone at the smaller size is the update a run at that size would have made). The sizes in use
are saved in every checkpoint (TrainingRun.track's ``sizes``) and a resume keeps them.

Under torchrun each rank backs off on its own: a phase that may back off holds no collective, so a
rank that retries only makes the others wait at the next one.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from common.sampler import release_static_cache


class Attempt:
    """One try of a phase at ``size`` (``retry``: after one that ran out of memory): the ``with`` block
    that runs it. An out-of-memory error inside it is held back (``out_of_memory`` set) while the size
    can still be halved."""

    def __init__(self, size: int, retry: bool):
        self.size, self.retry = size, retry
        self.out_of_memory = False

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        # Nothing of the error is kept: its traceback holds the phase's frames and their tensors.
        self.out_of_memory = exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError) and self.size > 1
        return self.out_of_memory


def free_memory(model=None) -> None:
    """Give back what the failed phase held: the sampler's static KV buffers of ``model`` (kept at the
    largest shape met: the smaller size reallocates its own), unreachable objects, and CUDA's cached
    free blocks (to the card, for the next allocation of another shape)."""
    if model is not None:
        release_static_cache(model)
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class BatchSizes:
    """The sizes a run has in use, by the name of the constant that set them (MICRO_BATCH_SIZE=16, ...):
    ``attempts`` halves one when its phase runs out of memory, for the rest of the run. ``model``: whose
    static KV buffers an out-of-memory error releases."""

    def __init__(self, model=None, **sizes: int):
        self.model = model
        self.sizes = dict(sizes)

    def __getitem__(self, name: str) -> int:
        return self.sizes[name]

    def attempts(self, name: str, phase: str, rewind: Sequence[torch.Generator] = ()) -> Iterator[Attempt]:
        """Tries of the phase named ``phase`` (for the line: "the rollouts") at the size ``name``, until
        one ends without an out-of-memory error; each failed one halves the size and rewinds ``rewind``
        to the phase's start, so that the retry draws what the first try drew."""
        states = [generator.get_state() for generator in rewind]
        retry = False
        while True:
            attempt = Attempt(self.sizes[name], retry)
            yield attempt
            if not attempt.out_of_memory:
                return
            free_memory(self.model)
            self.sizes[name] = attempt.size // 2
            tqdm.write(f"out of memory in {phase} at {name}={attempt.size}: retrying with {self.sizes[name]} "
                       f"for the rest of the run")
            for generator, state in zip(rewind, states):
                generator.set_state(state)
            retry = True

    def state_dict(self) -> dict[str, int]:
        return dict(self.sizes)

    def load_state_dict(self, saved: dict[str, int], unchanged: Sequence[str]) -> None:
        """A resumed run's sizes: each saved size smaller than this run's where its constant is
        ``unchanged`` from the resumed run's (the back-off lasts the run; a constant given anew wins)."""
        for name, size in saved.items():
            if name in self.sizes and name in unchanged and size < self.sizes[name]:
                print(f"resume: {name}={size}, as the resumed run had backed off to after running out of memory")
                self.sizes[name] = size
