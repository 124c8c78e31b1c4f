"""Pretrained tiny bases, built offline and cached per machine.

The paper fine-tunes pretrained models, so offline presets first pretrain tiny bases on a
separate public corpus (its own seed, no person shared with the record pool). The tokenizer
is trained on that same public corpus, so members never shape it and a cached base serves
every run whose corpus, tokenizer and model settings agree. The cache key is a hash of them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from kdaudit.config import RunConfig
from kdaudit.data.corpus import generate_records
from kdaudit.store import atomic_write_json, publish_dir, stable_hash

CORPUS_VERSION = 1   # bump when the builtin generators change what they write


def cache_root(cfg: RunConfig) -> Path:
    root = cfg.models.cache_dir or os.environ.get("KDAUDIT_CACHE") or "~/.cache/kdaudit"
    return Path(root).expanduser()


def pretraining_records(cfg: RunConfig):
    """The public pre-training corpus: builtin records of its own seed. The record pool is
    generated excluding these people, so the two share no person."""
    return generate_records(cfg.data.pretrain_records, cfg.data.pretrain_seed, id_prefix="pre")


def tokenizer_key(cfg: RunConfig) -> str:
    return stable_hash({"corpus": CORPUS_VERSION, "n": cfg.data.pretrain_records,
                        "seed": cfg.data.pretrain_seed, "vocab": cfg.models.vocab_size})


def base_key(cfg: RunConfig, preset: str) -> str:
    from kdaudit.models.zoo import ZOO

    from kdaudit import distributed

    key = {"tokenizer": tokenizer_key(cfg), "preset": preset, "arch": ZOO[preset].__dict__,
           "pretrain": cfg.pretrain.__dict__, "max_length": cfg.data.max_length,
           "seed": cfg.seed}
    if distributed.world() > 1:    # DDP pretraining is not bitwise the one-process run
        key["processes"] = distributed.world()
    return stable_hash(key)


def cached_tokenizer(cfg: RunConfig, texts: list[str]):
    """Train (or load from the cache) the offline BPE tokenizer on public pre-training text."""
    from kdaudit.models.loading import load_tokenizer
    from kdaudit.models.tokenizer import train_tokenizer

    path = cache_root(cfg) / "tokenizers" / tokenizer_key(cfg)
    if not (path / "tokenizer.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(texts, cfg.models.vocab_size, tmp)
        publish_dir(tmp, path)
    return load_tokenizer(path)


def cached_base(cfg: RunConfig, preset: str, tokenizer, texts: list[str]) -> Path:
    """Path of the pretrained base of zoo `preset`, pretraining it when not cached."""
    from kdaudit.data.template import encode_text
    from kdaudit.models.zoo import build_zoo_model
    from kdaudit.train.loop import TrainJob, train
    from kdaudit.train.methods import METHODS

    path = cache_root(cfg) / "bases" / f"{preset}-{base_key(cfg, preset)}"
    if (path / "model.safetensors").exists():
        return path
    examples = [encode_text(t, tokenizer, cfg.data.max_length) for t in texts]
    model = build_zoo_model(preset, tokenizer, seed=cfg.seed)
    train(TrainJob(model, examples, METHODS["pretrain"], cfg.pretrain, out_dir=path,
                   seed=cfg.seed, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                   run_key=path.name, mixed_precision=cfg.mixed_precision,
                   desc=f"pretrain {preset}"))
    atomic_write_json(path / "kdaudit_base.json", {"preset": preset, "key": path.name,
                                                   "pretrain_texts": len(texts)})
    return path


def external_config(cfg: RunConfig) -> RunConfig:
    """The settings of the builtin external model (`ref_ext`): the same recipe as the bases but
    its own corpus seed, hence its own corpus, tokenizer and weights."""
    import dataclasses

    from kdaudit import seeds

    data = dataclasses.replace(cfg.data, pretrain_seed=seeds.external(cfg.data.pretrain_seed))
    return dataclasses.replace(cfg, data=data, seed=seeds.external(cfg.seed))
