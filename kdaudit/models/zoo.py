"""Tiny model presets per family (teacher larger than student), built from transformers configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ZooEntry:
    family: str            # "gpt2" | "opt" | "llama"
    layers: int
    width: int
    heads: int
    max_positions: int = 256


ZOO: dict[str, ZooEntry] = {
    "gpt2-smoke-teacher": ZooEntry("gpt2", layers=2, width=64, heads=2),
    "gpt2-smoke-student": ZooEntry("gpt2", layers=1, width=48, heads=2),
    "gpt2-tiny-teacher": ZooEntry("gpt2", layers=3, width=192, heads=4),
    "gpt2-tiny-student": ZooEntry("gpt2", layers=2, width=128, heads=4),
    "opt-smoke-teacher": ZooEntry("opt", layers=2, width=64, heads=2),
    "opt-smoke-student": ZooEntry("opt", layers=1, width=48, heads=2),
    "opt-tiny-teacher": ZooEntry("opt", layers=3, width=192, heads=4),
    "opt-tiny-student": ZooEntry("opt", layers=2, width=128, heads=4),
    "llama-smoke-teacher": ZooEntry("llama", layers=2, width=64, heads=2),
    "llama-smoke-student": ZooEntry("llama", layers=1, width=48, heads=2),
    "llama-tiny-teacher": ZooEntry("llama", layers=3, width=192, heads=4),
    "llama-tiny-student": ZooEntry("llama", layers=2, width=128, heads=4),
}


def is_zoo(name: str) -> bool:
    return name in ZOO


def zoo_config(name: str, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """The transformers config of a zoo preset for a tokenizer of `vocab_size`."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    e = ZOO[name]
    ids: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                               pad_token_id=pad_id, tie_word_embeddings=True)
    if e.family == "gpt2":
        return GPT2Config(n_layer=e.layers, n_embd=e.width, n_head=e.heads,
                          n_positions=e.max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **ids)
    if e.family == "opt":
        return OPTConfig(num_hidden_layers=e.layers, hidden_size=e.width, num_attention_heads=e.heads,
                         ffn_dim=4 * e.width, word_embed_proj_dim=e.width,
                         max_position_embeddings=e.max_positions, dropout=0.0,
                         attention_dropout=0.0, activation_dropout=0.0, **ids)
    if e.family == "llama":
        return LlamaConfig(num_hidden_layers=e.layers, hidden_size=e.width,
                           num_attention_heads=e.heads, num_key_value_heads=e.heads,
                           intermediate_size=int(8 * e.width / 3) // 8 * 8,
                           max_position_embeddings=e.max_positions, **ids)
    raise ValueError(f"zoo preset '{name}': unknown family '{e.family}'")


def build_zoo_model(name: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised causal LM of preset `name`, seeded."""
    from transformers import AutoModelForCausalLM

    cfg = zoo_config(name, vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id,
                     eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)
