"""Several processes, one run: torchrun's environment, the process group, and the few collectives
the scripts need.

    torchrun --standalone --nproc_per_node=4 run_train_grpo.py ...   # 4 GPUs of one machine
    python run_train_grpo.py ...                                       # one process, as before

torchrun starts one process (a rank) per GPU and tells each who it is through environment
variables, as nanoGPT reads them: RANK (0 .. WORLD_SIZE - 1 over every machine), WORLD_SIZE,
LOCAL_RANK (its GPU on this machine) and LOCAL_WORLD_SIZE. Without them (plain ``python``) no
process group is started and every function here is what it would be for one process (a sum
over ranks is the value itself, a shard is everything), so the scripts need no branches for it.

It is PyTorch's own engine (torch.distributed: NCCL between GPUs, gloo between CPU processes),
with the trainable gradients summed by one all-reduce per optimizer step rather than by
DistributedDataParallel; sum_gradients says why.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from common.checkpoint import restore_rng_state, rng_state
from common.model import get_device

Item = TypeVar("Item")


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is among the run's processes (one process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes metrics and saves checkpoints."""
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 and in a plain single process; read from torchrun's RANK, so it holds before
    setup_distributed too (for the config printout)."""
    return int(os.environ.get("RANK", "0")) == 0


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_distributed(device_name: str = "auto") -> DistributedContext:
    """Join the process group when launched by torchrun (one process otherwise: nothing to do).

    The backend follows the device the model will use (common.model.get_device): NCCL for CUDA,
    each rank on the GPU of its LOCAL_RANK; gloo for CPU processes. A non-main rank's stdout goes
    to /dev/null: every print there would repeat rank 0's; its stderr (warnings, errors) stays.
    """
    if "RANK" not in os.environ:
        return DistributedContext()
    context = DistributedContext(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                 local_rank=int(os.environ["LOCAL_RANK"]),
                                 local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]))
    device = get_device(device_name)
    if device.type == "cuda" and dist.is_nccl_available():
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cuda":
        # PyTorch's Windows builds have no NCCL: gloo, through the host (issue 29, finding 16).
        torch.cuda.set_device(device)
        dist.init_process_group("gloo")
        if context.is_main:
            print(f"torchrun: {context.world_size} processes on CUDA through gloo (this PyTorch has no NCCL, as on "
                  f"Windows): the gradients are summed through host memory, slower than NCCL")
    elif device.type == "cpu":
        dist.init_process_group("gloo")
        _share_cpu_threads(context)
    else:
        raise SystemExit(f"error: torchrun runs on CUDA GPUs or on CPUs, not on {device.type}; "
                         f"run one process (python ...), or add --DEVICE=cpu")
    if not context.is_main:
        sys.stdout = open(os.devnull, "w")
    return context


def _share_cpu_threads(context: DistributedContext) -> None:
    """Share this machine's cores out between its processes.

    torch runs one thread per core in every process: N processes on one machine would ask for N
    times its cores. torchrun therefore sets OMP_NUM_THREADS=1 for each process when it is unset
    (and warns), which leaves cores idle. A process cannot tell that 1 from a user's own, so a set
    OMP_NUM_THREADS is respected (torch read it at start) and rank 0 names the value that would
    use every core; unset (another launcher, or one process per machine), each process gets its
    share of the cores.
    """
    cores = available_cores()
    fair_share = max(1, cores // context.local_world_size)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(fair_share)
    elif torch.get_num_threads() < fair_share and context.is_main:
        print(f"note: {context.local_world_size} processes x {torch.get_num_threads()} CPU thread(s) on {cores} "
              f"cores; OMP_NUM_THREADS={fair_share} torchrun ... would use every core")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    """Where small tensors for a collective must live: NCCL reduces GPU tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values, op):
    names = list(values) if isinstance(values, dict) else None
    numbers = [float(values[name]) for name in names] if names is not None else [float(values)]
    if _is_distributed():
        reduced = torch.tensor(numbers, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(reduced, op=op)
        numbers = reduced.tolist()
    return dict(zip(names, numbers)) if names is not None else numbers[0]


def all_reduce_sum(values):
    """The sum over ranks of a number, or of each value of a dict of numbers (in one collective).

    Numbers may be ints, floats or one-element tensors; sums come back as floats, added in float64
    so that token counts stay exact. In one process: the values themselves, as floats.
    """
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values):
    """The largest over ranks of a number (or one-element tensor), or of each value of a dict of them (in
    one collective), as floats; in one process, the values themselves."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the ranks, in place.

    Sum, not mean: each rank's loss is its share of the step's loss, the sum over its own tokens
    (or sequences, or pairs) divided by the normaliser of the WHOLE step, counted over every rank
    with all_reduce_sum. The step's loss is then the sum of the ranks' losses, and its gradient the
    sum of theirs: N ranks x B/N prompts make exactly the update of 1 rank x B prompts, however
    the tokens fall between ranks. (DDP averages, since it assumes each rank divided by its own
    count; here that would shrink every update N times.)

    A rank with nothing to train on (every group of its share dropped) still takes part: its
    missing gradients count as zeros, so every rank makes the same collectives and ends with the
    same gradients, hence the same clipped norm and the same optimizer step.

    Why not DistributedDataParallel: a step makes forward passes that must not synchronise
    (sampling, the reference with the adapters off, old log-probs), accumulates gradients over
    micro-batches (DDP would need no_sync on all but the last) and may give a rank no micro-batch
    at all (DDP would wait for it forever). One all-reduce of the trainable gradients before the
    optimizer step is what DDP does, at the one place it is needed.
    """
    if not _is_distributed():
        return
    gradients = []
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        gradients.append(parameter.grad)
    if dist.get_backend() != "nccl" and gradients and gradients[0].is_cuda:
        # gloo without NCCL (Windows) reduces host tensors: one flat copy there and back.
        flat = torch.cat([gradient.reshape(-1) for gradient in gradients]).cpu()
        dist.all_reduce(flat)
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset:offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()
        return
    pending = [dist.all_reduce(gradient, async_op=True) for gradient in gradients]
    for reduction in pending:
        reduction.wait()


def shard(items: Sequence[Item]) -> Sequence[Item]:
    """This rank's contiguous share of ``items`` (sizes differ by one at most); the shards of
    ranks 0, 1, ... in that order are ``items``. One process: all of them."""
    if not _is_distributed():
        return items
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return items[rank * len(items) // world_size:(rank + 1) * len(items) // world_size]


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (anything picklable), in rank order, on every rank; [obj] in one process."""
    if not _is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rank_states(context: DistributedContext, generators: dict[str, torch.Generator] | None = None) -> dict:
    """For a checkpoint: the world size and every rank's random state (python, numpy, torch and the
    named ``generators``), in rank order. A collective: every rank calls it; rank 0 saves it."""
    return {"world_size": context.world_size, "rng": all_gather_objects(rng_state(generators))}


def restore_rank_state(checkpoint: dict, context: DistributedContext,
                       generators: dict[str, torch.Generator] | None = None) -> None:
    """Give this rank back its own random state from a checkpoint of gather_rank_states (stored
    under ``extra["ranks"]``; a checkpoint without it is one process's). Each rank draws from its
    own stream (its samples differ from the others'), so a run resumes exactly only with the same
    number of processes; another number is refused."""
    saved = checkpoint["extra"].get("ranks", {"world_size": 1, "rng": [checkpoint["rng"]]})
    if saved["world_size"] != context.world_size:
        raise SystemExit(f"error: the checkpoint was written by a run of {saved['world_size']} process(es), this "
                         f"run has {context.world_size}: resume with the same number (torchrun --nproc_per_node "
                         f"and --nnodes), since each process continues its own random stream")
    restore_rng_state(saved["rng"][context.rank], generators)


def cleanup() -> None:
    """Leave the process group (at the end of a script; nothing to do in one process).

    All ranks meet at a barrier first: a rank that tears its connections down while another is
    still writing its checkpoint makes gloo abort the other at exit (seen once in a PPO test:
    "terminate called without an active exception", SIGABRT after the run had finished)."""
    if _is_distributed():
        dist.barrier()
        dist.destroy_process_group()
