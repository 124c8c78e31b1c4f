"""The one training loop. Pretraining, SFT and every KD method are configurations of it.

A method supplies its loss (see `methods.py`); the loop supplies batching, the optimizer and
schedule, Accelerate (device, precision, distribution), progress, a json-lines training log,
and checkpoints (safetensors) from which an interrupted run resumes. DP-SGD is a strategy the
loop calls (`strategies.DPSGD`, Opacus) where plain training has `NoDP`: the steps are the
same.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from kdaudit import seeds
from kdaudit.data.template import Encoded
from kdaudit.store import atomic_write_json, publish_dir
from kdaudit.train import dp as opacus_dp
from kdaudit.train.batching import batch_order
from kdaudit.train.config import KDParams, TrainConfig
from kdaudit.train.methods import Method, ResponseRows, lm_term, method_params
from kdaudit.train.sampling import Lockstep
from kdaudit.train.sources import BatchSource
from kdaudit.train.strategies import DPSGD, NoDP
from kdaudit.train.teacher_cache import TeacherCache

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainJob:
    """What one run of the loop needs.

    `params` are the method's parameters (`methods.method_params`; None: the method's
    defaults); `validation` feeds DistiLLM's schedule; `lm_examples` are the public
    corpus of the pretraining LM term, when the method has one (`params.lm_coef` > 0);
    `max_length` bounds prompt + sampled response. `run_key` identifies the inputs: a checkpoint left by an interrupted run with the
    same key is resumed, one with another key is discarded. `dp` (a plan from
    `kdaudit.dp.dpsgd.plan`) makes the run DP-SGD.
    """
    model: Any
    examples: Sequence[Encoded]
    method: Method
    cfg: TrainConfig
    out_dir: str | Path
    seed: int
    pad_id: int
    tokenizer: Any = None
    teacher: Any = None
    params: KDParams | None = None
    run_key: str = ""
    mixed_precision: str = "no"
    desc: str | None = "train"
    callbacks: Sequence[StepCallback] = ()
    validation: Sequence[Encoded] = ()
    max_length: int | None = None
    dp: opacus_dp.DPPlan | None = None
    private_log: str | Path | None = None   # DP: where the operator's diagnostics go
    lm_examples: Sequence[Encoded] = ()     # the public corpus of the pretraining LM term


@dataclass
class TrainResult:
    """What a run did. For DP-SGD, `first_loss` and `last_loss` are on private batches without
    noise: the operator's diagnostics, never to be published."""
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    resumed_from: int
    privacy: dict[str, Any] | None = None   # DP-SGD: the ε spent (kdaudit.dp.accounting)
    private_log: Path | None = None         # DP-SGD: where the training log went


# -- the run -------------------------------------------------------------------------------------
@dataclass
class _Run:
    """The prepared pieces of one run, shared by its steps."""
    job: TrainJob
    params: KDParams
    accelerator: Any
    dp: NoDP | DPSGD
    source: BatchSource
    model: Any                  # as wrapped (Accelerate or Opacus)
    optimizer: Any
    scheduler: Any
    teacher: Any                # as prepared by Accelerate, or None
    student: Any                # the plain model inside `model`
    plain_teacher: Any
    projection: torch.nn.Module | None   # DistilDP's hidden-state projection, or None
    batches: list[list[int]]
    teacher_cache: TeacherCache | None = None
    # with the cache and a loss with a row form: the student's LM head on the response
    # positions only (`_response_rows`); None until the first step checks it, False when off
    response_rows: bool | None = False


def private_log_path(out_dir: str | Path) -> Path:
    """Where a DP run's training log goes by default: beside its model folder, not in it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".private_log.jsonl")


def _private_log(job: TrainJob) -> Path:
    return Path(job.private_log or private_log_path(job.out_dir))


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".ckpt")


def train(job: TrainJob) -> TrainResult:
    """Train `job.model` on `job.examples` with the method's loss and data source; save it to
    `job.out_dir` (safetensors).

    With `job.dp`, training is DP-SGD (`kdaudit.train.dp`): Poisson batches, per-sample
    clipping, the plan's noise and number of steps; it restarts rather than resumes, and
    `privacy.json` beside the model records the ε the plan's accounting says was spent.
    """
    _check(job)
    out_dir = Path(job.out_dir)
    ckpt = _checkpoint_dir(out_dir)
    run = _prepare(job)
    total, accelerator = len(run.batches), run.accelerator
    start = _resume(accelerator, ckpt, job.run_key, total, run.source,
                    fresh=not run.dp.checkpoints)
    log_path = ckpt / "train_log.jsonl"
    before = run.source.prepare(run.student, run.plain_teacher)
    first_loss = last_loss = float("nan")
    t0 = time.time()
    bar = tqdm(total=total, initial=start, desc=job.desc, unit="step", dynamic_ncols=True,
               disable=not accelerator.is_main_process, mininterval=1.0)
    # one process writes the log and the checkpoint's shared files; the others only train
    with (log_path.open("a") if accelerator.is_main_process else open(os.devnull, "w")) as log:
        if before:   # DistiLLM's reference validation CE, step 0
            log.write(json.dumps({"step": 0, **before}) + "\n")
        for step in range(start, total):
            idx = run.batches[step]
            if not idx:   # an empty Poisson batch (DP-SGD): the step is noise only
                run.dp.noise_only_step(run.optimizer)
                run.scheduler.step()
                bar.update(1)
                continue
            last_loss, parts, origin = _step(run, step, idx)
            if step == start:
                first_loss = last_loss
            record = _record(run, step, last_loss, parts, origin)
            _log(log, record, step, total, job.cfg.log_every)
            bar.update(1)
            if not run.dp.private:
                bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
            for cb in job.callbacks:
                cb(step + 1, record)
            every = job.cfg.checkpoint_every
            if every and run.dp.checkpoints and (step + 1) % every == 0 and step + 1 < total:
                _save_checkpoint(accelerator, ckpt, run.source, step + 1, job.run_key)
    bar.close()

    accelerator.wait_for_everyone()
    privacy = run.dp.account(total)
    _save_model(run, out_dir, log_path, privacy)
    accelerator.free_memory()
    return TrainResult(steps=total, seconds=time.time() - t0, first_loss=first_loss,
                       last_loss=last_loss, resumed_from=start, privacy=privacy,
                       private_log=_private_log(job) if run.dp.private else None)


def _check(job: TrainJob) -> None:
    """A teacher where the method needs one, sharing the student's vocabulary."""
    method, teacher = job.method, job.teacher
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method '{method.name}' needs a teacher model")
    if teacher is not None and teacher.config.vocab_size != job.model.config.vocab_size:
        raise ValueError(f"method '{method.name}': teacher and student vocabularies differ "
                         f"({teacher.config.vocab_size} vs {job.model.config.vocab_size}); "
                         f"distillation needs one shared tokenizer")


def _prepare(job: TrainJob) -> _Run:
    """Seeds, the batch source and order, the optimizer and schedule, all wrapped for the
    devices (Accelerate) and for DP-SGD when the job asks for it. The order of these calls is
    the order of the random draws: keep it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    params = job.params if job.params is not None else method_params(job.method)
    dp = DPSGD(job.dp, [e.person for e in job.examples]) if job.dp is not None else NoDP()
    accelerator = Accelerator(mixed_precision=job.mixed_precision)
    if _sharded(accelerator) and job.dp is not None:
        raise ValueError(f"method '{job.method.name}': DP-SGD runs under DDP (Opacus's DPDDP), "
                         f"not FSDP: launch DP stages without an FSDP config")
    set_seed(job.seed)
    order = _order(job)
    total = dp.steps(order, accelerator.num_processes)
    lm = job.method.lm_term and params.lm_coef > 0
    if lm and not job.lm_examples:
        raise ValueError(f"method '{job.method.name}' has the pretraining LM term (lm_coef "
                         f"{params.lm_coef}) but no corpus was given (TrainJob.lm_examples)")
    source = BatchSource(job.method, job.examples, params, pad_id=job.pad_id,
                         eos_id=job.model.config.eos_token_id,
                         seed=seeds.per_index(job.seed, accelerator.process_index),
                         max_length=job.max_length or max(len(e.input_ids)
                                                          for e in job.examples),
                         # each process's share of the global batch (replay draws, LM term)
                         batch_size=max(1, job.cfg.batch_size // accelerator.num_processes),
                         total_steps=total,
                         steps_per_epoch=math.ceil(len(job.examples) / job.cfg.batch_size),
                         validation=job.validation, lm_examples=job.lm_examples if lm else (),
                         lockstep=_lockstep(accelerator))
    job.model.train()
    params = dp.setup(job.model, job.method, params, accelerator.device)
    projection = _attach_projection(job.model, job.teacher, job.method, params)
    model, optimizer, scheduler = dp.wrap(job.model, _optimizer(job.model, job.cfg),
                                          _scheduler(job.cfg, total), accelerator,
                                          len(job.examples), job.seed)
    teacher = plain_teacher = None
    if job.teacher is not None and _sharded(accelerator):
        # whole in every process: its forwards stay local, so neither the sampling nor the
        # teacher cache (each process's own examples) has to keep step
        teacher = job.teacher.to(accelerator.device)
    elif job.teacher is not None:
        teacher = accelerator.prepare_model(job.teacher, evaluation_mode=True)
    if teacher is not None:
        teacher.eval()
        plain_teacher = accelerator.unwrap_model(teacher)
    # off-policy methods see the same examples every epoch: the teacher's answer can be kept
    cache = TeacherCache(params.teacher_cache_topk) if (
        job.method.off_policy and params.teacher_cache_topk and projection is None) else None
    student = dp.unwrap(model, accelerator)
    rows = (cache is not None and getattr(job.method.loss, "rows", None) is not None
            and job.dp is None and accelerator.num_processes == 1
            and student.base_model is not student and student.get_output_embeddings() is not None)
    return _Run(job, params, accelerator, dp, source, model, optimizer, scheduler, teacher,
                student, plain_teacher, projection, dp.batches(order, accelerator), cache,
                None if rows else False)


def _sharded(accelerator) -> bool:
    """FSDP: the student's weights are sharded over the processes."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _lockstep(accelerator) -> Lockstep | None:
    """Under FSDP every student forward is a collective, so on-policy sampling keeps the
    processes in step (`Lockstep`); elsewhere each process samples on its own (None)."""
    if not _sharded(accelerator):
        return None
    from accelerate.utils import broadcast_object_list

    def every(flag: bool) -> bool:
        return bool(accelerator.gather(torch.tensor([flag], device=accelerator.device)).all())

    return Lockstep(first=lambda value: broadcast_object_list([value], from_process=0)[0],
                    all=every)


def _order(job: TrainJob) -> list[list[int]]:
    """Every step's example indices: seeded, length-grouped epochs, cycled to `max_steps`."""
    cfg = job.cfg
    order = batch_order([len(e.input_ids) for e in job.examples], cfg.batch_size, cfg.epochs,
                        job.seed)
    if cfg.max_steps:
        order = (order * (cfg.max_steps // len(order) + 1))[:cfg.max_steps]
    return order


def _attach_projection(model, teacher, method: Method, params: KDParams
                       ) -> torch.nn.Module | None:
    """DistilDP's hidden-state term: the student's last hidden state through a learned
    projection onto the teacher's width (the identity when the widths agree), registered on
    the model so that the optimizer trains it (it is saved without it). None without the
    term."""
    if not (method.hidden and params.hidden_weight):
        return None
    d_s, d_t = model.config.hidden_size, teacher.config.hidden_size
    projection = torch.nn.Linear(d_s, d_t, bias=False) if d_s != d_t else torch.nn.Identity()
    model.add_module("kdaudit_projection", projection)
    return projection


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _scheduler(cfg: TrainConfig, total: int) -> Callable:
    """Cosine decay after a linear warm-up, made for the optimizer once it is wrapped."""
    from transformers import get_cosine_schedule_with_warmup

    return lambda optimizer: get_cosine_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total), total)


def _forward(run: _Run, batch, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(student logits, teacher logits or None) for the batch of examples `idx`; with
    DistilDP's hidden term, both models' last hidden states go into `batch.extras`, the
    student's through the projection. With a teacher cache the teacher runs on a batch only
    while some of its examples are not yet cached."""
    hidden = run.projection is not None
    with run.accelerator.autocast():
        out = run.model(**batch.inputs, output_hidden_states=hidden)
        teacher_logits = None
        if run.job.method.needs_teacher and run.teacher_cache is not None:
            teacher_logits = run.teacher_cache.logits(batch, idx,
                                                      lambda: _teacher(run, batch).logits)
        elif run.job.method.needs_teacher:
            t_out = _teacher(run, batch, hidden)
            teacher_logits = t_out.logits
        if hidden:
            batch.extras["student_hidden"] = run.projection(out.hidden_states[-1])
            batch.extras["teacher_hidden"] = t_out.hidden_states[-1]
    return out.logits, teacher_logits


def _response_rows(run: _Run, batch, idx: Sequence[int]) -> ResponseRows | None:
    """The student's logits at the positions that predict a response token, through its base
    model and LM head, and the teacher's rows from the cache. On the first step, checked
    against the student's own forward at those positions; where they differ (a head that
    scales or caps its logits), None now and `run.response_rows` off."""
    student, mask, kw = run.student, batch.target_mask[:, 1:].bool(), batch.inputs

    def head(hidden):
        return student.get_output_embeddings()(hidden[:, :-1][mask])

    with run.accelerator.autocast():
        if run.response_rows is None:    # in eval mode: no dropout draw, nothing to undo
            with torch.no_grad():
                student.eval()
                full = student(**kw).logits[:, :-1][mask]
                rows = head(student.base_model(**kw)[0])
                student.train()
            run.response_rows = full.shape == rows.shape and torch.allclose(
                full.float(), rows.float(), rtol=1e-4, atol=1e-5)
            if not run.response_rows:
                return None
        logits = head(student.base_model(**kw)[0])
        teacher = run.teacher_cache.rows(batch, idx, lambda: _teacher(run, batch).logits)
    return ResponseRows.of(logits, teacher, batch)


@torch.no_grad()
def _teacher(run: _Run, batch, hidden: bool = False):
    """The teacher's output on the batch (with its hidden states for DistilDP's term)."""
    return run.teacher(**batch.inputs, output_hidden_states=hidden)


def _lm_term(run: _Run) -> tuple[torch.Tensor, dict[str, float]]:
    """The pretraining LM term on the next batch of the public corpus."""
    batch = run.source.next_lm_batch().to(run.accelerator.device)
    kw = batch.inputs
    with run.accelerator.autocast():
        logits = run.model(**kw).logits
        teacher_logits = None
        if run.params.lm_kd_ratio:
            with torch.no_grad():
                teacher_logits = run.teacher(**kw).logits
    return lm_term(logits, teacher_logits, batch, run.params)


def _step(run: _Run, step: int, idx: Sequence[int]
          ) -> tuple[float, dict[str, float], dict[str, float]]:
    """One optimisation step on these examples: (loss, the loss's parts, where the batch's
    rows came from). The method's loss, plus `lm_coef` times the LM term when it has one."""
    batch, origin = run.source.next_batch(step, idx, run.student, run.plain_teacher)
    batch = batch.to(run.accelerator.device)
    rows = _response_rows(run, batch, idx) if run.response_rows is not False else None
    if rows is not None:
        loss, parts = run.job.method.loss.rows(rows, run.params)
    else:
        logits, teacher_logits = _forward(run, batch, idx)
        loss, parts = run.job.method.loss(logits, teacher_logits, batch, run.params)
    if run.source.lm_examples:
        lm, lm_parts = _lm_term(run)
        loss = loss + run.params.lm_coef * lm
        parts.update(lm_parts)
    parts.update(run.dp.log_parts(idx))
    run.accelerator.backward(loss, inputs=run.dp.backward_inputs)   # DP: to the embeddings
    if run.job.cfg.grad_clip and run.dp.clips_by_norm:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.job.cfg.grad_clip)
    run.dp.before_step(run.optimizer, idx)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.item(), parts, origin


def _record(run: _Run, step: int, loss: float, parts: dict[str, float],
            origin: dict[str, float]) -> dict[str, float]:
    """The step's log record; DistiLLM's schedule evaluates here (`source.after_step`)."""
    return {"step": step + 1, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
            **{k: float(v) for k, v in parts.items()},
            **{k: float(v) for k, v in origin.items()},
            **run.source.after_step(step + 1, run.student, run.plain_teacher)}


def _log(log, record: dict[str, float], step: int, total: int, every: int) -> None:
    """Every `every` steps, the first and the last, and every validation loss: the same
    lines whether or not the run was interrupted and resumed."""
    if (step + 1) % every == 0 or step + 1 == total or step == 0 or "val_loss" in record:
        log.write(json.dumps(record) + "\n")
        log.flush()


def _save_model(run: _Run, out_dir: Path, log_path: Path,
                privacy: dict[str, Any] | None) -> None:
    """The main process publishes the model (without the projection), the tokenizer, the
    training log and `privacy.json`, then removes the checkpoint. Under FSDP the weights are
    first gathered from every process."""
    state = run.accelerator.get_state_dict(run.model) if _sharded(run.accelerator) else None
    if not run.accelerator.is_main_process:
        return
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("kdaudit_projection.")}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if run.projection is not None:
        del run.student.kdaudit_projection
    run.student.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
    if privacy is not None:
        atomic_write_json(tmp / "privacy.json", privacy)
    if run.job.tokenizer is not None:
        run.job.tokenizer.save_pretrained(str(tmp))
    if run.dp.private:   # losses of private batches: the operator's, outside the model folder
        private_log = _private_log(run.job)
        private_log.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, private_log)
    else:
        shutil.copy(log_path, tmp / "train_log.jsonl")
    publish_dir(tmp, out_dir)
    shutil.rmtree(_checkpoint_dir(out_dir), ignore_errors=True)


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
