"""The one training loop. Pretraining, SFT and every KD method are configurations of it.

A method supplies its loss (see `methods.py`); the loop supplies batching, the optimizer and
schedule, Accelerate (device, precision, distribution), progress, a json-lines training log,
and checkpoints (safetensors) from which an interrupted run resumes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from kdaudit.data.template import Encoded
from kdaudit.store import atomic_write_json, publish_dir
from kdaudit.train import dp as opacus_dp
from kdaudit.train.batching import batch_order
from kdaudit.train.config import TrainConfig
from kdaudit.train.methods import DP_METHODS, Method, method_params
from kdaudit.train.sources import BatchSource

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    resumed_from: int
    privacy: dict[str, Any] | None = None   # DP-SGD: the ε spent (kdaudit.dp.accounting)


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".ckpt")


def train(model, examples: Sequence[Encoded], method: Method, cfg: TrainConfig, *,
          out_dir: str | Path, seed: int, pad_id: int, tokenizer=None, teacher=None,
          params: dict[str, Any] | None = None, run_key: str = "", mixed_precision: str = "no",
          desc: str = "train", callbacks: Sequence[StepCallback] = (),
          validation: Sequence[Encoded] = (), max_length: int | None = None,
          dp: opacus_dp.DPPlan | None = None) -> TrainResult:
    """Train `model` on `examples` with `method`'s loss and data source; save it to `out_dir`
    (safetensors).

    `params` are the method's parameters (`methods.method_params`); `validation` feeds
    DistiLLM's schedule; `max_length` bounds prompt + sampled response. `run_key` identifies
    the inputs; a checkpoint left by an interrupted run with the same key is resumed, one with
    another key is discarded. With `dp` (a plan from `kdaudit.dp.dpsgd.plan`), training is
    DP-SGD (`kdaudit.train.dp`): Poisson batches, per-sample clipping, the plan's noise and
    number of steps; it restarts rather than resumes, and `privacy.json` beside the model
    records the ε the plan's accounting says was spent.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    out_dir = Path(out_dir)
    ckpt = _checkpoint_dir(out_dir)
    params = params if params is not None else method_params(method)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method '{method.name}' needs a teacher model")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"method '{method.name}': teacher and student vocabularies differ "
                         f"({teacher.config.vocab_size} vs {model.config.vocab_size}); "
                         f"distillation needs one shared tokenizer")

    accelerator = Accelerator(mixed_precision=mixed_precision)
    set_seed(seed)
    source = BatchSource(method, examples, params, pad_id=pad_id,
                         eos_id=model.config.eos_token_id,
                         seed=seed * 1_000_003 + accelerator.process_index,
                         max_length=max_length or max(len(e.input_ids) for e in examples),
                         validation=validation)
    order = batch_order([len(e.input_ids) for e in examples], cfg.batch_size, cfg.epochs, seed)
    if cfg.max_steps:
        order = (order * (cfg.max_steps // len(order) + 1))[:cfg.max_steps]
    world, rank = accelerator.num_processes, accelerator.process_index
    total = len(order) // world if world > 1 else len(order)

    model.train()
    plan = dp
    if plan is not None:
        if method.name not in DP_METHODS:
            raise ValueError(f"DP-SGD supports the methods {DP_METHODS}, not '{method.name}'")
        # per-sequence means: one example's gradient ignores the others' lengths
        params = {**params, "per_sequence": True}
        total = plan.steps
        opacus_dp.check_supported(model)
        model.to(accelerator.device)
    # DistilDP's hidden-state term: the student's last hidden state through a learned
    # projection onto the teacher's width (the identity when the widths agree)
    hidden = bool(method.hidden and params.get("hidden_weight"))
    projection = torch.nn.Identity()
    if hidden:
        d_s, d_t = model.config.hidden_size, teacher.config.hidden_size
        if d_s != d_t:
            projection = torch.nn.Linear(d_s, d_t, bias=False)
        model.add_module("kdaudit_projection", projection)   # trained, saved without it
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    if plan is not None:   # Opacus's Poisson loader is never handed to Accelerate
        model, optimizer, poisson, _ = opacus_dp.make_private(
            model, optimizer, len(examples), plan,
            seed if world == 1 else seed * 1_000_003 + rank, distributed=world > 1)
        order = opacus_dp.poisson_batches(poisson, total)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    if plan is None:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        teacher.eval()

    start = _resume(accelerator, ckpt, run_key, total, source, fresh=plan is not None)
    log_path = ckpt / "train_log.jsonl"

    student = accelerator.unwrap_model(model) if plan is None else opacus_dp.unwrap(model)
    plain_teacher = accelerator.unwrap_model(teacher) if teacher is not None else None
    source.prepare(student, plain_teacher)
    first_loss = last_loss = float("nan")
    t0 = time.time()
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               disable=not accelerator.is_main_process, mininterval=1.0)
    # one process writes the log and the checkpoint's shared files; the others only train
    with (log_path.open("a") if accelerator.is_main_process else open(os.devnull, "w")) as log:
        for step in range(start, total):
            # DP-SGD: each rank has its own Poisson batches (Opacus's distributed sampler)
            idx = order[step * world + rank] if world > 1 and plan is None else order[step]
            if plan is not None and not idx:   # an empty Poisson batch: the step is noise only
                opacus_dp.noise_only_step(optimizer)
                scheduler.step()
                bar.update(1)
                continue
            batch, origin = source.next_batch(idx, student, plain_teacher)
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, output_hidden_states=hidden)
                logits = out.logits
                teacher_logits = None
                if method.needs_teacher:
                    with torch.no_grad():
                        t_out = teacher(input_ids=batch.input_ids,
                                        attention_mask=batch.attention_mask,
                                        position_ids=batch.position_ids,
                                        output_hidden_states=hidden)
                    teacher_logits = t_out.logits
                if hidden:
                    batch.extras["student_hidden"] = projection(out.hidden_states[-1])
                    batch.extras["teacher_hidden"] = t_out.hidden_states[-1]
            loss, parts = method.loss(logits, teacher_logits, batch, params)
            if plan is not None:
                parts["batch_size"] = float(len(idx))
            accelerator.backward(loss)
            if cfg.grad_clip and plan is None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            last_loss = loss.item()
            if step == start:
                first_loss = last_loss
            record = {"step": step + 1, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                      **{k: float(v) for k, v in parts.items()},
                      **{k: float(v) for k, v in origin.items()},
                      **source.after_step(step + 1, student, plain_teacher)}
            if ((step + 1) % cfg.log_every == 0 or step + 1 == total or step == start
                    or "val_loss" in record):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
            for cb in callbacks:
                cb(step + 1, record)
            if (cfg.checkpoint_every and plan is None and (step + 1) % cfg.checkpoint_every == 0
                    and step + 1 < total):
                _save_checkpoint(accelerator, ckpt, source, step + 1, run_key)
    bar.close()

    accelerator.wait_for_everyone()
    privacy = plan.account(total) if plan is not None and plan.account else None
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if hidden:
            del student.kdaudit_projection
        student.save_pretrained(str(tmp), safe_serialization=True)
        if privacy is not None:
            atomic_write_json(tmp / "privacy.json", privacy)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        shutil.copy(log_path, tmp / "train_log.jsonl")
        publish_dir(tmp, out_dir)
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.free_memory()
    return TrainResult(steps=total, seconds=time.time() - t0, first_loss=first_loss,
                       last_loss=last_loss, resumed_from=start,
                       privacy=privacy)


def _resume(accelerator, ckpt: Path, run_key: str, total: int, source: BatchSource, *,
            fresh: bool) -> int:
    """The step to start from. A checkpoint an interrupted run with the same key left is
    loaded by every process (each its own sampler state); any other one is removed, by the
    main process alone, once every process has looked. DP-SGD (`fresh`) always restarts."""
    state_file = ckpt / "trainer_state.json"
    start = 0
    if not fresh and state_file.exists():
        state = json.loads(state_file.read_text())
        source_file = ckpt / f"source_{accelerator.process_index}.json"
        if state.get("run_key") == run_key and 0 < state["step"] < total and \
                source_file.exists():
            accelerator.load_state(str(ckpt / "state"))
            source.load_state_dict(json.loads(source_file.read_text()))
            start = state["step"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if start == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return start


def _save_checkpoint(accelerator, ckpt: Path, source: BatchSource, step: int,
                     run_key: str) -> None:
    """Optimizer, scheduler and RNG states (Accelerate), each process's sampler state as
    JSON, then the step marker that makes the checkpoint valid, written last by the main
    process. The old marker goes first, so a save cut short never passes for a whole one."""
    if accelerator.is_main_process:
        (ckpt / "trainer_state.json").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt / "state"))
    atomic_write_json(ckpt / f"source_{accelerator.process_index}.json", source.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(ckpt / "trainer_state.json", {"step": step, "run_key": run_key})
