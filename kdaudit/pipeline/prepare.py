"""The stages before training: data splits, the tokenizer, the base models, `ref_ext`'s
independent model."""
from __future__ import annotations

import random
import shutil
from functools import partial
from pathlib import Path
from typing import Sequence, TypeVar

from kdaudit import distributed, seeds
from kdaudit.config import RunConfig
from kdaudit.data import records as rec
from kdaudit.data.canaries import make_canaries, training_records, write_canaries
from kdaudit.data.corpus import generate_records, person_name
from kdaudit.data.splits import split_records
from kdaudit.models import is_zoo, load_model, load_tokenizer
from kdaudit.models.bases import cached_base, cached_tokenizer, external_config, \
    pretraining_records
from kdaudit.pipeline.stage import RunContext, Stage
from kdaudit.store import publish_dir

SPLITS = ("members", "nonmembers", "public", "validation")
T = TypeVar("T")


def reference_halves(pool: Sequence[T], k: int, seed: int) -> list[list[T]]:
    """LiRA / RMIA training sets: k random halves of `pool` in complementary pairs, so every
    record is IN for half of the references and OUT for the other half (k even)."""
    halves: list[list[T]] = []
    for i in range(k):
        if i % 2:
            inside = {id(x) for x in halves[-1]}
            halves.append([x for x in pool if id(x) not in inside])
        else:
            halves.append(random.Random(seeds.reference_half(seed, i)).sample(list(pool), len(pool) // 2))
    return halves


def pretraining_texts(cfg: RunConfig) -> list[str]:
    from kdaudit.data.template import format_text

    return [format_text(r) for r in pretraining_records(cfg)]


def make_data(run: RunContext) -> dict:
    """Draw or load the pool, split it, write the reference halves and the canaries."""
    cfg, d = run.cfg, run.cfg.data
    if d.source == "builtin":
        exclude = frozenset(person_name(r) for r in pretraining_records(cfg))
        pool = generate_records(d.pool_size, cfg.seed, exclude_names=exclude)
    else:
        pool = rec.load_records(d.source, mapping=d.mapping)
    s = split_records(pool, n_members=d.n_members, n_nonmembers=d.n_nonmembers,
                      n_public=d.n_public, n_validation=d.n_validation, seed=cfg.seed,
                      dedup_ngram=d.dedup_ngram, dedup_threshold=d.dedup_threshold)
    for split, records in s.items():
        rec.write_jsonl(records, run.dir.data(split))
    info = {"sizes": {k: len(v) for k, v in s.items()}, "pool": len(pool)}
    if s.dropped_public:
        info["public_near_duplicates_dropped"] = s.dropped_public
        more = ", …" if len(s.dropped_public) > 3 else ""
        print(f"data: left out {len(s.dropped_public)} public record(s) that near-duplicate a "
              f"member ({', '.join(s.dropped_public[:3])}{more})", flush=True)
    halves = reference_halves(s.members + s.nonmembers, cfg.reference_models, cfg.seed)
    for k, half in enumerate(halves):
        rec.write_jsonl(half, run.dir.data(f"reference_{k}"))
    if d.canaries_repeated or d.canaries_once:
        names = frozenset(r.secrets[0] for r in pool if r.secrets)
        canaries = make_canaries(d.canaries_repeated, d.canary_repeats, d.canaries_once,
                                 seed=seeds.canaries(cfg.seed), exclude_names=names)
        write_canaries(canaries, run.dir.data("canaries"))
        info["canaries_in_members"] = len(training_records(canaries))
    return info


def data_stage(run: RunContext) -> Stage:
    cfg, d = run.cfg, run.cfg.data
    outputs = [run.dir.data(s) for s in SPLITS]
    outputs += [run.dir.data(f"reference_{k}") for k in range(cfg.reference_models)]
    if d.canaries_repeated or d.canaries_once:
        outputs.append(run.dir.data("canaries"))
    return Stage("data", {"data": d.__dict__, "seed": cfg.seed,
                          "references": cfg.reference_models}, outputs, partial(make_data, run))


def make_tokenizer(run: RunContext) -> dict:
    teacher = run.cfg.models.teacher
    tok = cached_tokenizer(run.cfg, pretraining_texts(run.cfg)) if is_zoo(teacher) \
        else load_tokenizer(teacher)
    tmp = run.dir.tokenizer.with_name("tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    publish_dir(tmp, run.dir.tokenizer)
    run.forget_tokenizer()
    return {"vocab_size": len(tok)}


def tokenizer_stage(run: RunContext) -> Stage:
    d = run.cfg.data
    return Stage("tokenizer", {"models": run.cfg.models.__dict__, "data": d.pretrain_records,
                               "seed": d.pretrain_seed},
                 [run.dir.tokenizer / "tokenizer_config.json"], partial(make_tokenizer, run))


def _copy_model(source: str | Path, out: Path, *, with_tokenizer: bool = False) -> None:
    """A model folder or a hub name, materialised once in `out`."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if Path(source).exists():
        shutil.copytree(source, tmp)
    else:
        load_model(source).save_pretrained(str(tmp), safe_serialization=True)
        if with_tokenizer:
            load_tokenizer(source).save_pretrained(str(tmp))
    publish_dir(tmp, out)


def make_base(run: RunContext, model_id: str, preset: str) -> dict:
    """A zoo base pretrained (once, in the base cache) on the run's public text, or the
    user's model."""
    source = cached_base(run.cfg, preset, run.tokenizer, pretraining_texts(run.cfg)) \
        if is_zoo(preset) else preset
    if distributed.is_main():    # every process pretrains (DDP); one copies the result
        _copy_model(source, run.dir.model(model_id))
    return {"source": str(preset)}


def base_stage(run: RunContext, model_id: str, preset: str) -> Stage:
    return Stage(model_id, {"preset": preset, "tokenizer": run.hashes["tokenizer"],
                            "pretrain": run.cfg.pretrain.__dict__, "seed": run.cfg.seed},
                 [run.dir.model(model_id) / "config.json"],
                 partial(make_base, run, model_id, preset), every_process=True)


def make_external(run: RunContext) -> dict:
    """`ref_ext`'s independent model, with its own tokenizer, in models/ref_ext: the builtin
    one is pretrained on other text with its own tokenizer."""
    source = run.cfg.models.external
    if source == "builtin":
        ext = external_config(run.cfg)
        texts = pretraining_texts(ext)
        student = run.cfg.models.student
        preset = student if is_zoo(student) else "gpt2-tiny-student"
        if distributed.is_main():      # one process trains the tokenizer, the others load it
            cached_tokenizer(ext, texts)
        distributed.barrier()
        base = cached_base(ext, preset, cached_tokenizer(ext, texts), texts)
        if distributed.is_main():
            _copy_model(base, run.dir.model("ref_ext"))
    elif distributed.is_main():
        _copy_model(source, run.dir.model("ref_ext"), with_tokenizer=True)
    return {"source": source}


def external_stage(run: RunContext) -> Stage:
    cfg = run.cfg
    return Stage("ref_ext", {"external": cfg.models.external, "pretrain": cfg.pretrain.__dict__,
                             "student": cfg.models.student, "seed": cfg.seed,
                             "data": [cfg.data.pretrain_records, cfg.data.pretrain_seed,
                                      cfg.models.vocab_size]},
                 [run.dir.model("ref_ext") / "config.json"], partial(make_external, run),
                 every_process=True)
