"""Shared fixtures: tests never touch the network and never write to the user's cache."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores: one intra-op thread each, so that none of
    # them oversubscribes the machine (subprocesses the tests start inherit this too)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Pretrained tiny bases go to a per-session folder, not ~/.cache/kdaudit."""
    os.environ["KDAUDIT_CACHE"] = str(tmp_path_factory.mktemp("kdaudit-cache"))
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    yield


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny GPT-2 (smoke teacher preset) briefly trained on builtin records, and its data.

    Returns (model, tokenizer, records); the model is in eval mode.
    """
    import torch

    from kdaudit.config import TrainConfig
    from kdaudit.data.corpus import generate_records
    from kdaudit.data.template import encode_record, format_text
    from kdaudit.models import build_zoo_model, train_tokenizer
    from kdaudit.train.loop import TrainJob, train
    from kdaudit.train.methods import METHODS

    records = generate_records(60, seed=7)
    tok = train_tokenizer([format_text(r) for r in generate_records(300, seed=8)], 400)
    model = build_zoo_model("gpt2-smoke-teacher", tok, seed=0)
    examples = [encode_record(r, tok, 160) for r in records[:30]]
    out = tmp_path_factory.mktemp("tiny_lm") / "model"
    train(TrainJob(model, examples, METHODS["sft"],
                   TrainConfig(epochs=3, batch_size=8, lr=5e-3, checkpoint_every=0),
                   out_dir=out, seed=0, pad_id=tok.pad_token_id, tokenizer=tok, desc=None))
    model.eval()
    torch.manual_seed(0)
    return model, tok, records, out


@pytest.fixture(scope="module")
def one_thread():
    """Width-64 models gain nothing from intra-op threads, and spinning threads slow a shared
    2-core machine down by an order of magnitude: `pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
