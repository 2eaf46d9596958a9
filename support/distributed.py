"""torchrun plumbing: with one process every function here is a plain passthrough.

- setup_distributed: the process group from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (none set: one process).
- print0 (nanochat's): print on rank 0 only, above the progress bar.
- any_process, all_reduce_mean, rank_0_errors: agreeing across processes (a stop, the step's metrics,
  rank 0's refusal, which must end every process at once rather than leave them waiting).
- wrap (DDP, or FSDP2 with --fsdp), no_sync (skip the gradient all-reduce until the last micro-batch),
  gather_model_state / gather_optimizer_state / load_optimizer_state / unsharded: full, unsharded
  states for saving and evaluating under FSDP.
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from support.errors import UserError


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nothing set = one process."""
    if "RANK" not in os.environ:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    """print() on rank 0 only; written above the progress bar (tqdm.write) so the bar is not torn."""
    if is_main_process():
        from tqdm import tqdm
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def any_process(flag: bool, device) -> bool:
    """True on every process if `flag` is True on any of them (a collective: every process must call it)."""
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world_size
    return values


class rank_0_errors:
    """`with rank_0_errors(device):` around what only rank 0 does (output directory checks, writes), in
    place of the barrier after it. A UserError raised there on rank 0 ends every process at
    once with exit status 2 (rank 0 prints the message), where the others would wait at the next
    collective until torchrun tears them down (nccl) or die with a 'Connection closed by peer' traceback
    (gloo). One process: nothing to share."""
    def __init__(self, device: torch.device):
        self.device = device
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if self.world == 1 or (e is not None and not isinstance(e, UserError)):
            return False  # a bug keeps its traceback
        # Every process waits here for rank 0's outcome. (broadcast_object_list carried the message once, but
        # let gloo abort at exit under load.)
        if not any_process(e is not None, self.device):
            return False
        dist.barrier()
        dist.destroy_process_group()  # every process is here: leave cleanly, without nccl's exit warning
        if e is not None:
            return False  # rank 0 raises its own error (its traceback with --debug)
        echo = UserError("rank 0 stopped the run; its message says why")
        echo.quiet = True  # only rank 0 prints
        raise echo from None


def end_distributed(world: int):
    """The end of a run: every process leaves the process group together."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---- data parallel wrappers (DDP, FSDP2) ---------------------------------------------------------


def wrap(model, fsdp: bool, device, world: int):
    """The model as the processes train it together: DDP, or FSDP2 with --fsdp; itself for one process."""
    if world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:  # shard block by block: one block's full weights live at a time
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def no_sync(train_model, sync: bool):
    """Around a micro-batch's forward: unless `sync`, skip the gradient all-reduce (DDP's no_sync, FSDP2's
    set_requires_gradient_sync), so an accumulation all-reduces once, after its last micro-batch."""
    if hasattr(train_model, "set_requires_gradient_sync"):  # FSDP2
        train_model.set_requires_gradient_sync(sync)
    with train_model.no_sync() if (not sync and hasattr(train_model, "no_sync")) else nullcontext():
        yield


def _sharded(fsdp: bool) -> bool:
    return fsdp and dist.is_initialized() and dist.get_world_size() > 1


def gather_model_state(train_model, fsdp: bool) -> dict | None:
    """Under FSDP, the full (unsharded) model state on CPU, for saving (a collective); None otherwise."""
    if not _sharded(fsdp):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(optimizer, train_model, fsdp: bool) -> dict:
    if not _sharded(fsdp):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(train_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer, train_model, state: dict, fsdp: bool):
    if not (fsdp and dist.is_initialized()):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(train_model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def unsharded(model, full_state: dict | None):
    """The model to save or evaluate: `model` itself, or under FSDP a copy holding the gathered full
    (unsharded) weights (`full_state` from gather_model_state)."""
    if full_state is None:
        return model
    with torch.device("meta"):  # the same class (rm.RewardModel), empty, to receive the full weights
        shell = type(model)(model.config, model.head_type, model.pooling)
    shell.load_state_dict(full_state, assign=True)
    shell.tokenizer, shell.provenance = model.tokenizer, model.provenance
    return shell
