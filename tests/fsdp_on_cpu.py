"""`python -m torch.distributed.run … tests/fsdp_on_cpu.py ARGS`: kdaudit's CLI with its
training under Accelerate's FSDP2 on CPU processes (gloo), as the tests' stand-in for GPUs.

`accelerate launch --config_file benchmarks/accelerate/fsdp_gpus.yaml` turns that file's
`fsdp_config` into FSDP_* variables and Accelerate builds its FSDP plugin from them; on CPU
processes Accelerate 1.16 then keeps DDP all the same (FSDP is chosen for accelerators
only). This sets the same variables from the same file and makes the one choice Accelerate
would make on GPUs: the process state's type is FSDP, with that plugin. The rest (wrapping,
sharded forward and backward, optimizer, checkpoints, gathering the weights) is Accelerate's
and torch's own code, unchanged.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parent.parent / "benchmarks" / "accelerate" / "fsdp_gpus.yaml"


def force_fsdp() -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    fsdp = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    for key, value in fsdp.items():
        os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    PartialState(cpu=True).distributed_type = DistributedType.FSDP
    Accelerator(cpu=True).state.fsdp_plugin = FullyShardedDataParallelPlugin()


if __name__ == "__main__":
    force_fsdp()
    from kdaudit.cli import main

    sys.exit(main(sys.argv[1:]))
