"""Run by tests/test_dpsgd_distributed.py under torchrun: DP-SGD on two CPU processes."""
import json
import sys

import torch
import torch.distributed as dist

from kdaudit.config import DPConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.dp.dpsgd import plan
from kdaudit.train import loop
from kdaudit.train.methods import METHODS

tok = train_tokenizer([format_text(r) for r in generate_records(100, seed=31)], 300)
examples = [encode_record(r, tok, 64) for r in generate_records(48, seed=32)]
model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
sizes = []
result = loop.train(loop.TrainJob(
    model, examples, METHODS["sft"], TrainConfig(epochs=1, batch_size=8), out_dir=sys.argv[1],
    seed=0, pad_id=tok.pad_token_id, desc=None, dp=plan(len(examples), 8, 1, DPConfig(epsilon=4.0)),
    callbacks=[lambda step, record: sizes.append(record["batch_size"])]))
checksum = float(sum(p.double().sum() for p in model.parameters()))
print("RESULT", json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(),
                            "steps": result.steps, "sizes": sizes, "checksum": checksum,
                            "epsilon": result.privacy["epsilon"]}), flush=True)
