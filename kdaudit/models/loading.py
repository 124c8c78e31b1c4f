"""Loading and saving models and tokenizers: safetensors only, never remote code."""
from __future__ import annotations

from pathlib import Path

import torch


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    if tok.pad_token is None:  # GPT-2, Llama: pad with EOS (attention masks keep it inert)
        tok.pad_token = tok.eos_token
    return tok


def compute_device() -> torch.device:
    """Where models are scored and sample: `KDAUDIT_DEVICE` if set (e.g. "cpu", "cuda:1"),
    else, under a launcher, this process's own device, else the first CUDA device, else
    Apple's MPS, else the CPU. Training places itself through Accelerate."""
    import os

    from kdaudit import distributed

    chosen = os.environ.get("KDAUDIT_DEVICE")
    if chosen:
        return torch.device(chosen)
    if distributed.launched():
        return torch.device(distributed.device())
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None):
    """Any causal LM by hub name or folder, with safetensors weights only, in eval mode, on
    `device` (default: the CPU; scoring passes `compute_device()`)."""
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    if path.exists() and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights; kdaudit loads safetensors "
                                f"only (convert .bin weights with `save_pretrained(..., "
                                f"safe_serialization=True)`)")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), use_safetensors=True,
                                                 trust_remote_code=False, **kwargs)
    model.eval()
    return model.to(device) if device is not None else model


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    """Save weights (safetensors) and config; the tokenizer too when given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
