"""Several processes under a launcher (`accelerate launch`, `torchrun`): which one does what.

Training stages run in every process (Accelerate's DDP or FSDP, Opacus's DPDDP for DP-SGD;
under FSDP the loop keeps on-policy sampling in step, `kdaudit.train.sampling.Lockstep`). Audit
stages run in every process too: each scores and generates its share of the batches
(`attacks.parallel`, through `scoring_shard`), every process gets the merged result, and the
main one writes it. Every other stage (data, tokenizer, tables, report) runs in the main
process while the others wait, so each file is written by one process. Without a launcher
there is one process and every function here is a no-op.
"""
from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=None)
def _state():
    """Accelerate's process state, on the CPU (gloo) where Accelerate would put it: when
    ACCELERATE_USE_CPU is set or no CUDA device is there."""
    import os

    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or \
        not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def launched() -> bool:
    """True under a launcher with more than one process (cheap: reads the environment)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    return _state().is_main_process if launched() else True


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


def from_main(value: Any) -> Any:
    """The main process's `value`, in every process."""
    if not launched():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def device():
    """This process's device under a launcher (its own GPU; the CPU under gloo), else None."""
    return _state().device if launched() else None


def scoring_shard():
    """This process's `attacks.parallel.Shard` under a launcher, else None (no sharing)."""
    if not launched():
        return None
    from accelerate.utils import gather_object

    from attacks.parallel import Shard

    state = _state()
    return Shard(state.process_index, state.num_processes, lambda obj: gather_object([obj]))
