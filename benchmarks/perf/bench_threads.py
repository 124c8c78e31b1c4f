"""Sharing the CPU: the tiny teacher's SFT step alone and beside one competing process that
does the same work, under each thread policy, measured side by side in one run.

    python benchmarks/perf/bench_threads.py [--steps 20]

Each measurement is a fresh subprocess (OpenMP reads its environment once, at start-up).
The policies are measured in alternating rounds and each keeps its best median, so that a
slow spell of the machine hits every policy rather than one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, os, sys, time
import kdaudit          # sets the thread policy before torch loads OpenMP
import torch
kdaudit.threads.govern()   # the governor, unless KDAUDIT_THREADS is fixed or off
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.train.batching import collate

steps = int(sys.argv[1])
records = generate_records(64, seed=0)
tok = train_tokenizer([format_text(r) for r in records], 2048)
model = build_zoo_model("gpt2-tiny-teacher", tok, seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
rows = [encode_record(r, tok, 160) for r in records[:16]]
batch = collate(rows, tok.pad_token_id)
times = []
for i in range(steps):
    t0 = time.perf_counter()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                labels=batch.input_ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times[steps // 2:], "threads": torch.get_num_threads()}))
"""


def measure(env: dict[str, str], steps: int, competitor: bool) -> tuple[float, int]:
    rival = None
    if competitor:
        rival = subprocess.Popen([sys.executable, "-c", WORKER, str(steps * 50)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(8)      # let it reach its training loop
    try:
        out = subprocess.run([sys.executable, "-c", WORKER, str(steps)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return statistics.median(result["times"]), result["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds over the policies; the best of each is kept")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in (
        "OMP_WAIT_POLICY", "KDAUDIT_THREADS", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    off = {**base, "KDAUDIT_THREADS": "off"}
    policies = {"torch defaults (libgomp spin 300k)": off,
                "kdaudit default (governor, spin 10k)": base,
                "KDAUDIT_THREADS=fixed (spin 10k)": {**base, "KDAUDIT_THREADS": "fixed"},
                "OMP_WAIT_POLICY=PASSIVE": {**off, "OMP_WAIT_POLICY": "PASSIVE"},
                "one thread (OMP_NUM_THREADS=1)": {**off, "OMP_NUM_THREADS": "1"}}
    print(f"tiny teacher SFT step (batch 16 × ≤160 tokens), {os.cpu_count()} CPUs, best of "
          f"{args.rounds} alternating rounds of the median of the last {args.steps - args.steps // 2} "
          f"steps; threads: the count at the end")
    best = {name: [float("inf"), float("inf"), 0, 0] for name in policies}
    for _ in range(args.rounds):
        for name, env in policies.items():
            alone, best[name][2] = measure(env, args.steps, competitor=False)
            shared, best[name][3] = measure(env, args.steps, competitor=True)
            best[name][:2] = min(best[name][0], alone), min(best[name][1], shared)
    for name, (alone, shared, n_alone, n_shared) in best.items():
        print(f"{name:<36} alone {alone * 1000:7.1f} ms ({n_alone} threads), beside one "
              f"competing process {shared * 1000:7.1f} ms ({n_shared} threads, "
              f"{shared / alone:.1f}×)")


if __name__ == "__main__":
    main()
