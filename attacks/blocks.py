"""Weight-perturbation signals: MoPe (whole model) and per-block MoPe.

MoPe (Li et al. 2023): score(x) = mean_j NLL(θ + ε_j; x) − NLL(θ; x), ε_j ~ N(0, σ²) on every
parameter. Higher means a sharper minimum around x, i.e. more likely a member. Block MoPe
perturbs only the parameters of one transformer block at a time, giving a per-block risk map.

NLL is the mean over each sequence's scored (response) tokens, with the batching conventions
of `attacks.scoring`: length-sorted batches, right padding, explicit position ids.

Noise is drawn on the CPU from a `torch.Generator` seeded by (seed, perturbation, block), so it
is reproducible, identical on every device, and drawn once per perturbation: every batch sees
the same draw, and scores do not depend on batching. The model is perturbed in place and always
restored bit-identically from saved copies (also when an exception is raised).

Block MoPe fast path: perturbing block i leaves everything upstream of it unchanged, so one clean
forward pass per batch captures each block's input hidden states and call arguments (attention
mask, position embeddings/ids, ...); each perturbation then reruns only blocks i..L−1, the final
norm (and OPT's `project_out`) and the LM head. Only the scored positions' logits are read, so
the LM head and the last block's MLP (where the block has an `mlp` submodule: GPT-2, Llama,
GPT-NeoX; not OPT) run on those positions only; the scores are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from attacks import parallel
from attacks.scoring import (ScoringBatch, check_scoring_inputs, default_batch_tokens,
                             scoring_batches)

# Known block lists, as dotted paths from the causal-LM wrapper.
BLOCK_PATHS = ("transformer.h", "model.decoder.layers", "model.layers")
# Attribute names of the final norm on the module that owns the block list.
FINAL_NORM_NAMES = ("ln_f", "final_layer_norm", "norm", "final_layernorm", "norm_f")


# ----------------------------------------------------------------------------- blocks

def _locate_blocks(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(owner, block list): a known path first, else the longest ModuleList of same-class items."""
    for path in BLOCK_PATHS:
        owner, found = None, model
        for name in path.split("."):
            owner, found = found, getattr(found, name, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return owner, found
    best: tuple[nn.Module, nn.ModuleList] | None = None
    for owner in model.modules():
        for child in owner.children():
            if (isinstance(child, nn.ModuleList) and len(child) > 0
                    and len({type(m) for m in child}) == 1
                    and (best is None or len(child) > len(best[1]))):
                best = (owner, child)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no transformer block list found (looked for "
            f"{', '.join(BLOCK_PATHS)} and for any nn.ModuleList whose items share one class)")
    return best


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order (GPT-2 `transformer.h`, OPT
    `model.decoder.layers`, Llama `model.layers`, else the longest nn.ModuleList of same-class
    modules). Raises ValueError when there is none."""
    return list(_locate_blocks(model)[1])


def _final_layers(model: nn.Module, owner: nn.Module) -> list[nn.Module]:
    """What maps the last block's output to logits: final norm, OPT `project_out`, LM head."""
    layers = []
    for name in FINAL_NORM_NAMES:
        if hasattr(owner, name):
            if getattr(owner, name) is not None:
                layers.append(getattr(owner, name))
            break
    if getattr(owner, "project_out", None) is not None:
        layers.append(owner.project_out)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"{type(model).__name__}: no LM head found (get_output_embeddings() "
                         f"or `lm_head`); block MoPe needs a causal LM")
    return layers + [head]


# ----------------------------------------------------------------------------- noise

def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from an integer key via numpy's SeedSequence (well mixed)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _mope_key(seed: int, perturbation: int) -> tuple[int, ...]:
    return (seed, 0, perturbation)


def _block_key(seed: int, block: int, perturbation: int) -> tuple[int, ...]:
    return (seed, 1, block, perturbation)


def _gaussian(params: Sequence[torch.Tensor], key: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """Standard normal float32 CPU noise shaped like each of `params`, in order, for `key`."""
    g = _generator(*key)
    for p in params:
        yield torch.randn(p.shape, generator=g, dtype=torch.float32)


@torch.no_grad()
def _add_noise_(params: Sequence[torch.Tensor],
                noise: Iterator[torch.Tensor] | Sequence[torch.Tensor], sigma: float) -> None:
    """In place: p ← p + σ·ε for each parameter."""
    for p, eps in zip(params, noise, strict=True):
        p.add_(eps.to(device=p.device, dtype=p.dtype), alpha=sigma)


@torch.no_grad()
def _restore_(params: Sequence[torch.Tensor], originals: Sequence[torch.Tensor]) -> None:
    for p, o in zip(params, originals, strict=True):
        p.copy_(o)


# ----------------------------------------------------------------------------- batching

def _check_args(sequences, score_from, sigma: float, n_perturbations: int,
                batch_size: int) -> None:
    check_scoring_inputs(sequences, score_from)
    if sigma < 0 or n_perturbations < 1 or batch_size < 1:
        raise ValueError(f"need sigma >= 0, n_perturbations >= 1 and batch_size >= 1, got "
                         f"{sigma}, {n_perturbations}, {batch_size}")



def _mean_nll(logits: torch.Tensor, batch: ScoringBatch) -> np.ndarray:
    """(B,) float64 mean NLL of each row's scored tokens from their logits (n_scored, V), in
    row-major order (`scored_logits`), softmax in float32."""
    sel = batch.score[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)                     # (n_tok, V)
    nll = -logp.gather(1, batch.ids[:, 1:][sel][:, None]).squeeze(1)
    rows = sel.nonzero()[:, 0]                                           # row-major, like [sel]
    total = torch.zeros(len(sel), dtype=torch.float64, device=nll.device)
    total.index_add_(0, rows, nll.double())
    return (total / sel.sum(1)).cpu().numpy()


def _logits(model: nn.Module, batch: ScoringBatch) -> torch.Tensor:
    """The model's own logits at the positions that predict scored tokens, (n_scored, V)."""
    logits = model(input_ids=batch.ids, attention_mask=batch.attn, position_ids=batch.pos,
                   use_cache=False).logits
    return logits[:, :-1][batch.score[:, 1:]]


# ----------------------------------------------------------------------------- MoPe

@torch.no_grad()
def mope_scores(model: nn.Module, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                *, pad_id: int, sigma: float = 0.01, n_perturbations: int = 10, seed: int = 0,
                batch_size: int = 32) -> np.ndarray:
    """MoPe per sequence, (N_seq,) float64: mean_j NLL(θ + ε_j) − NLL(θ), ε_j ~ N(0, σ²) on
    every parameter, perturbation j seeded from (seed, j)."""
    _check_args(sequences, score_from, sigma, n_perturbations, batch_size)
    params = list(model.parameters())                 # tied weights appear (and move) once
    device = params[0].device
    batches = [b for _, b in parallel.my_batches(scoring_batches(
        sequences, score_from, pad_id, batch_size, device, default_batch_tokens(device)))]
    clean = np.zeros(len(sequences))
    perturbed = np.zeros(len(sequences))
    originals = [p.detach().clone() for p in params]
    was_training = model.training
    try:
        model.eval()
        for b in batches:
            clean[b.idx] = _mean_nll(_logits(model, b), b)
        for j in range(n_perturbations):
            _add_noise_(params, _gaussian(params, _mope_key(seed, j)), sigma)
            for b in batches:
                perturbed[b.idx] += _mean_nll(_logits(model, b), b)
            _restore_(params, originals)
    finally:
        _restore_(params, originals)
        model.train(was_training)
    return _merged(perturbed / n_perturbations - clean, batches)


def _merged(scores: np.ndarray, batches: Sequence[ScoringBatch]) -> np.ndarray:
    """`scores` (..., N_seq), filled at the sequences of this process's `batches`, with every
    other process's sequences filled in too (`attacks.parallel`)."""
    local = {int(i): scores[..., i] for b in batches for i in b.idx}
    n = scores.shape[-1]
    return np.stack(parallel.in_order(local, n), axis=-1) if n else scores


# ----------------------------------------------------------------------------- block MoPe

def _hidden(out: Any) -> torch.Tensor:
    """Hidden states from a block's output: a tensor, or the first item of a tuple/ModelOutput."""
    return out if isinstance(out, torch.Tensor) else out[0]


class _Capture:
    """Forward pre-hooks recording each block's (args, kwargs) during one clean pass."""

    def __init__(self, blocks: Sequence[nn.Module]):
        self.blocks = blocks
        self.calls: list[tuple[tuple, dict] | None] = [None] * len(blocks)

    def __enter__(self) -> "_Capture":
        self.calls = [None] * len(self.blocks)
        self.handles = [blk.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, blk in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, i: int) -> Callable:
        def hook(module, args, kwargs):
            if self.calls[i] is not None:
                raise RuntimeError(f"block {i} ran twice in one forward pass; the block MoPe "
                                   f"fast path needs each block applied exactly once")
            self.calls[i] = (args, dict(kwargs))
        return hook

    def hidden_in(self, i: int) -> torch.Tensor:
        args, kwargs = self.calls[i]
        return args[0] if args else kwargs["hidden_states"]


class _MLPOnRows:
    """Hooks that run a block's per-position MLP (`block.mlp`) on the rows of `rows` (B, T)
    only, writing zeros elsewhere. Used on the last block, whose output is read at the scored
    positions only: the MLP is most of a block's work, and the others are thrown away. A block
    without an `mlp` submodule taking (B, T, d) hidden states runs in full."""

    def __init__(self, block: nn.Module, rows: torch.Tensor):
        self.mlp, self.rows, self.active = getattr(block, "mlp", None), rows, False

    def __enter__(self) -> "_MLPOnRows":
        self.handles = [] if not isinstance(self.mlp, nn.Module) else [
            self.mlp.register_forward_pre_hook(self._select),
            self.mlp.register_forward_hook(self._scatter)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _select(self, module, args):
        x = args[0] if args else None
        self.active = isinstance(x, torch.Tensor) and x.dim() == 3 and \
            x.shape[:2] == self.rows.shape
        return (x[self.rows], *args[1:]) if self.active else None

    def _scatter(self, module, args, out):
        if not self.active or not isinstance(out, torch.Tensor):
            return None
        full = out.new_zeros(*self.rows.shape, out.shape[-1])
        full[self.rows] = out
        return full


def _run_from(start: int, blocks: Sequence[nn.Module], calls: Sequence[tuple[tuple, dict]],
              final: Sequence[nn.Module], hidden: torch.Tensor,
              batch: ScoringBatch) -> torch.Tensor:
    """Logits at the batch's scored positions, (n_scored, V), from `hidden` entering block
    `start`: blocks start..L−1, then the final norm and the LM head (per position, so on the
    scored positions only; the last block's MLP too, see `_MLPOnRows`)."""
    read = torch.zeros_like(batch.score)          # positions whose output predicts a scored token
    read[:, :-1] = batch.score[:, 1:]
    h = hidden
    for k in range(start, len(blocks)):
        args, kwargs = calls[k]
        with _MLPOnRows(blocks[k], read) if k == len(blocks) - 1 else contextlib.nullcontext():
            if args:
                out = blocks[k](h, *args[1:], **kwargs)
            else:
                out = blocks[k](**{**kwargs, "hidden_states": h})
        h = _hidden(out)
    h = h[read]                                   # row-major, like `_logits`
    for layer in final:
        h = layer(h)
    return h


@torch.no_grad()
def block_mope_scores(model: nn.Module, sequences: Sequence[Sequence[int]],
                      score_from: Sequence[int], *, pad_id: int, sigma: float = 0.01,
                      n_perturbations: int = 10, seed: int = 0, batch_size: int = 32,
                      blocks: Sequence[int] | None = None) -> np.ndarray:
    """Per-block MoPe, (n_blocks, N_seq) float64: row r is mean_j NLL(block b perturbed) −
    NLL(clean) for b = blocks[r] (default: all blocks), perturbation j seeded from (seed, b, j).

    The noise of each (block, perturbation) is drawn once and kept for all batches, which costs
    n_perturbations × (parameters of the chosen blocks) of memory on the model's device.
    """
    _check_args(sequences, score_from, sigma, n_perturbations, batch_size)
    owner, block_list = _locate_blocks(model)
    layers = list(block_list)
    n_layers = len(layers)
    chosen = list(range(n_layers)) if blocks is None else [int(b) for b in blocks]
    for b in chosen:
        if not 0 <= b < n_layers:
            raise ValueError(f"block index {b} out of range for {n_layers} blocks")
    final = _final_layers(model, owner)
    device = next(model.parameters()).device
    batches = [b for _, b in parallel.my_batches(scoring_batches(
        sequences, score_from, pad_id, batch_size, device, default_batch_tokens(device)))]

    params = {b: list(layers[b].parameters()) for b in chosen}
    originals = {b: [p.detach().clone() for p in params[b]] for b in chosen}
    noise: dict[tuple[int, int], list[torch.Tensor]] = {}
    scores = np.zeros((len(chosen), len(sequences)))
    capture = _Capture(layers)
    was_training = model.training
    try:
        model.eval()
        for n_batch, batch in enumerate(batches):
            with capture:
                logits = _logits(model, batch)
            clean = _mean_nll(logits, batch)
            missing = [k for k in range(min(chosen, default=n_layers), n_layers)
                       if capture.calls[k] is None]
            if missing:
                raise RuntimeError(f"{type(model).__name__}: blocks {missing} did not run in "
                                   f"the forward pass")
            if n_batch == 0 and chosen:   # the fast path must reproduce the model exactly
                start = min(chosen)
                fast = _run_from(start, layers, capture.calls, final, capture.hidden_in(start),
                                 batch)
                if fast.shape != logits.shape or not torch.allclose(fast.float(), logits.float(),
                                                                    rtol=1e-4, atol=1e-4):
                    raise RuntimeError(
                        f"{type(model).__name__}: rerunning blocks {start}..{n_layers - 1}, the "
                        f"final norm and the LM head does not reproduce the model's logits; "
                        f"block MoPe does not support this architecture")
            for r, b in enumerate(chosen):
                hidden = capture.hidden_in(b)
                total = np.zeros(len(batch.idx))
                for j in range(n_perturbations):
                    if (b, j) not in noise:
                        noise[b, j] = [eps.to(device) for eps in
                                       _gaussian(params[b], _block_key(seed, b, j))]
                    try:
                        _add_noise_(params[b], noise[b, j], sigma)
                        logits = _run_from(b, layers, capture.calls, final, hidden, batch)
                    finally:
                        _restore_(params[b], originals[b])
                    total += _mean_nll(logits, batch)
                scores[r, batch.idx] = total / n_perturbations - clean
            capture.calls = [None] * n_layers     # free this batch's activations
    finally:
        for b in chosen:
            _restore_(params[b], originals[b])
        model.train(was_training)
    return _merged(scores, batches)
