"""MoPe and per-block MoPe against straightforward per-sequence, full-forward references."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from attacks.blocks import (_add_noise_, _block_key, _gaussian, _mope_key, _restore_,
                            block_mope_scores, find_blocks, mope_scores)

FAMILIES = {"gpt2": ("gpt2-smoke-teacher", "transformer.h", "GPT2Block"),
            "opt": ("opt-smoke-teacher", "model.decoder.layers", "OPTDecoderLayer"),
            "llama": ("llama-smoke-teacher", "model.layers", "LlamaDecoderLayer")}
# beyond the zoo: OPT with project_in/out and no final norm (like opt-350m), and GPT-NeoX,
# whose blocks (`gpt_neox.layers`) are found by the generic same-class ModuleList rule
EXTRA = {"opt-proj": "model.decoder.layers", "neox": "gpt_neox.layers"}
ATOL = 1e-5
N_PERT = 3
PAD = 0        # the offline tokenizer's EOS/PAD id (checked in the `tok` fixture)
SIGMA = 0.02


def _get(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    from kdaudit.data.corpus import generate_records
    from kdaudit.data.template import format_text
    from kdaudit.models import train_tokenizer

    tokenizer = train_tokenizer([format_text(r) for r in generate_records(40, seed=3)], 300)
    assert tokenizer.pad_token_id == PAD
    return tokenizer


@pytest.fixture(scope="module")
def data(tok):
    """Prompt-tail + response-head windows of varied lengths, so batches need padding."""
    from kdaudit.data.corpus import generate_records
    from kdaudit.data.template import encode_record

    windows = [(20, 30), (12, 45), (30, 10), (8, 25), (25, 40), (16, 18), (5, 3), (22, 33)]
    seqs, starts = [], []
    for rec, (p, r) in zip(generate_records(len(windows), seed=11), windows):
        enc = encode_record(rec, tok, 512)
        s = enc.response_start
        assert p <= s and s + r <= len(enc.input_ids)
        seqs.append(enc.input_ids[s - p:s + r])
        starts.append(p)
    return seqs, starts


@pytest.fixture(scope="module")
def models(tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    from kdaudit.models import build_zoo_model

    out = {fam: build_zoo_model(preset, tok, seed=0) for fam, (preset, _, _) in FAMILIES.items()}
    torch.manual_seed(0)
    out["opt-proj"] = OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2,
        num_attention_heads=2, ffn_dim=128, max_position_embeddings=256,
        do_layer_norm_before=False, dropout=0.0, pad_token_id=PAD))
    out["neox"] = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=256, pad_token_id=PAD))
    with torch.no_grad():
        for m in out.values():
            # fresh inits are near uniform; a wider spread gives perturbations real effects
            for p in m.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.08, generator=torch.Generator().manual_seed(p.numel()))
            m.eval()
    return out


def seq_nll(model: nn.Module, ids: list[int], start: int) -> float:
    """Mean NLL of ids[start:], one unpadded sequence, default positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits[start - 1:-1].float(), -1)
    return -logp.gather(1, torch.tensor(ids[start:])[:, None]).mean().item()


def naive_block_mope(model, path, seqs, starts, *, sigma, n, seed) -> np.ndarray:
    """Perturb block i of a copy with the same noise and run the full model per sequence."""
    m = copy.deepcopy(model).eval()
    clean = np.array([seq_nll(m, s, f) for s, f in zip(seqs, starts)])
    layers = _get(m, path)
    out = np.zeros((len(layers), len(seqs)))
    for i, blk in enumerate(layers):
        params = list(blk.parameters())
        saved = [p.detach().clone() for p in params]
        for j in range(n):
            with torch.no_grad():
                for p, eps in zip(params, _gaussian(params, _block_key(seed, i, j))):
                    p.add_(eps, alpha=sigma)
            out[i] += [seq_nll(m, s, f) for s, f in zip(seqs, starts)]
            with torch.no_grad():
                for p, o in zip(params, saved):
                    p.copy_(o)
    return out / n - clean


def naive_mope(model, seqs, starts, *, sigma, n, seed) -> np.ndarray:
    clean = np.array([seq_nll(model, s, f) for s, f in zip(seqs, starts)])
    total = np.zeros(len(seqs))
    for j in range(n):
        m = copy.deepcopy(model).eval()
        params = list(m.parameters())
        with torch.no_grad():
            for p, eps in zip(params, _gaussian(params, _mope_key(seed, j))):
                p.add_(eps, alpha=sigma)
        total += [seq_nll(m, s, f) for s, f in zip(seqs, starts)]
    return total / n - clean


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"parameter {k} changed"


# ----------------------------------------------------------------------------- find_blocks

@pytest.mark.parametrize("fam", FAMILIES)
def test_find_blocks_known_families(models, fam):
    _, path, cls = FAMILIES[fam]
    blocks = find_blocks(models[fam])
    assert len(blocks) == 2
    assert all(type(b).__name__ == cls for b in blocks)
    assert all(a is b for a, b in zip(blocks, _get(models[fam], path)))


def test_find_blocks_generic_and_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Tanh(), nn.GELU()])
            self.stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.short = nn.ModuleList([nn.ReLU(), nn.ReLU()])

    net = Net()
    assert all(a is b for a, b in zip(find_blocks(net), net.stack)) and len(find_blocks(net)) == 3
    with pytest.raises(ValueError, match="Linear.*no transformer block list"):
        find_blocks(nn.Linear(3, 3))

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

    with pytest.raises(ValueError, match="Mixed"):
        find_blocks(Mixed())


# ----------------------------------------------------------------------------- block MoPe

@pytest.mark.parametrize("fam", [*FAMILIES, *EXTRA])
def test_block_mope_matches_naive_full_forward(models, data, fam):
    seqs, starts = data
    model = models[fam]
    path = FAMILIES[fam][1] if fam in FAMILIES else EXTRA[fam]
    got = block_mope_scores(model, seqs, starts, pad_id=PAD, sigma=SIGMA, n_perturbations=N_PERT,
                            seed=5, batch_size=3)
    want = naive_block_mope(model, path, seqs, starts, sigma=SIGMA, n=N_PERT, seed=5)
    assert got.shape == (2, len(seqs)) and got.dtype == np.float64
    assert np.abs(want).max() > 100 * ATOL            # the perturbation does something
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("fam", FAMILIES)
def test_perturbing_block_leaves_upstream_bit_identical(models, data, fam):
    seqs, _ = data
    model = copy.deepcopy(models[fam])
    layers = find_blocks(model)
    ids = torch.tensor([seqs[0]])

    def run(perturb: int | None):
        acts: dict[str, torch.Tensor] = {}
        handles = []
        for k, blk in enumerate(layers):
            def pre(mod, args, kwargs, k=k):
                acts[f"in{k}"] = (args[0] if args else kwargs["hidden_states"]).clone()

            def post(mod, args, out, k=k):
                acts[f"out{k}"] = (out if isinstance(out, torch.Tensor) else out[0]).clone()

            handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(blk.register_forward_hook(post))
        params = list(layers[perturb].parameters()) if perturb is not None else []
        saved = [p.detach().clone() for p in params]
        try:
            _add_noise_(params, _gaussian(params, _block_key(0, perturb or 0, 0)), SIGMA)
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            _restore_(params, saved)
            for h in handles:
                h.remove()
        return acts

    clean = run(None)
    for i in range(len(layers)):
        pert = run(i)
        for k in range(i):
            assert torch.equal(pert[f"in{k}"], clean[f"in{k}"])
            assert torch.equal(pert[f"out{k}"], clean[f"out{k}"])
        assert torch.equal(pert[f"in{i}"], clean[f"in{i}"])
        assert not torch.equal(pert[f"out{i}"], clean[f"out{i}"])   # block i itself changed


@pytest.mark.parametrize("fam", ["gpt2", "llama", "neox"])
def test_the_last_block_s_mlp_runs_on_the_scored_positions_only(models, data, fam):
    """In a perturbed pass the last block's MLP sees one row per scored token (its output is
    read nowhere else); earlier blocks' MLPs see every position. Scores match the naive path
    (test above), so the trim is exact where it matters."""
    seqs, starts = data
    model = models[fam]
    layers = find_blocks(model)
    rows: dict[int, list[int]] = {0: [], len(layers) - 1: []}

    def count(k):
        def hook(module, args, out):
            x = args[0]
            rows[k].append(x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1])
        return hook

    handles = [layers[k].mlp.register_forward_hook(count(k)) for k in rows]
    try:
        block_mope_scores(model, seqs, starts, pad_id=PAD, n_perturbations=1,
                          batch_size=len(seqs), blocks=[len(layers) - 1])
    finally:
        for h in handles:
            h.remove()
    scored = sum(len(s) - f for s, f in zip(seqs, starts))
    padded = len(seqs) * max(map(len, seqs))
    assert rows[0] == [padded]                   # the clean pass; block 0 is not rerun
    assert rows[len(layers) - 1] == [padded, scored, scored]   # clean, fast-path check, perturbed


def test_block_subset_batching_and_seed(models, data):
    seqs, starts = data
    model = models["llama"]
    kw = dict(pad_id=PAD, sigma=SIGMA, n_perturbations=2, seed=3)
    full = block_mope_scores(model, seqs, starts, batch_size=8, **kw)
    np.testing.assert_array_equal(block_mope_scores(model, seqs, starts, batch_size=8, **kw), full)
    np.testing.assert_allclose(block_mope_scores(model, seqs, starts, batch_size=1, **kw), full,
                               rtol=0, atol=ATOL)
    np.testing.assert_allclose(block_mope_scores(model, seqs, starts, batch_size=8, blocks=[1],
                                                 **kw), full[1:], rtol=0, atol=1e-12)
    other = block_mope_scores(model, seqs, starts, batch_size=8, **{**kw, "seed": 4})
    assert not np.allclose(other, full, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="out of range"):
        block_mope_scores(model, seqs, starts, blocks=[2], **kw)


def test_fast_path_mismatch_is_an_error(models, data):
    """A model that post-processes logits outside final norm + LM head is refused, not misread."""
    seqs, starts = data
    model = copy.deepcopy(models["gpt2"])

    def soft_cap(mod, args, kwargs, out):
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.register_forward_hook(soft_cap, with_kwargs=True)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        block_mope_scores(model, seqs, starts, pad_id=PAD, n_perturbations=1)


# ----------------------------------------------------------------------------- restoring weights

@pytest.mark.parametrize("fam", FAMILIES)
def test_weights_restored_after_calls(models, data, fam):
    seqs, starts = data
    model = models[fam]
    snap = snapshot(model)
    block_mope_scores(model, seqs, starts, pad_id=PAD, n_perturbations=2, batch_size=4)
    assert_same_weights(model, snap)
    mope_scores(model, seqs, starts, pad_id=PAD, n_perturbations=2, batch_size=4)
    assert_same_weights(model, snap)
    assert not model.training


@pytest.mark.parametrize("which", ["block", "mope"])
def test_weights_restored_after_exception(models, data, which):
    seqs, starts = data
    model = copy.deepcopy(models["opt"]).train()
    snap = snapshot(model)
    calls = {"n": 0}

    def explode(mod, args, out):
        calls["n"] += 1
        if calls["n"] == 3:     # after the clean pass(es), while weights are perturbed
            raise KeyboardInterrupt("boom")

    handle = find_blocks(model)[-1].register_forward_hook(explode)
    fn = block_mope_scores if which == "block" else mope_scores
    with pytest.raises(KeyboardInterrupt):
        fn(model, seqs, starts, pad_id=PAD, n_perturbations=2, batch_size=len(seqs))
    handle.remove()
    assert calls["n"] == 3
    assert_same_weights(model, snap)
    assert model.training                  # mode restored too


# ----------------------------------------------------------------------------- MoPe

@pytest.mark.parametrize("fam", FAMILIES)
def test_mope_matches_naive(models, data, fam):
    seqs, starts = data
    model = models[fam]
    got = mope_scores(model, seqs, starts, pad_id=PAD, sigma=SIGMA, n_perturbations=N_PERT,
                      seed=2, batch_size=3)
    want = naive_mope(model, seqs, starts, sigma=SIGMA, n=N_PERT, seed=2)
    assert got.shape == (len(seqs),) and got.dtype == np.float64
    assert np.abs(want).max() > 100 * ATOL
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_mope_reproducible_and_batch_independent(models, data):
    seqs, starts = data
    model = models["gpt2"]
    kw = dict(pad_id=PAD, seed=7)                 # defaults: sigma 0.01, 10 perturbations
    a = mope_scores(model, seqs, starts, batch_size=8, **kw)
    np.testing.assert_array_equal(mope_scores(model, seqs, starts, batch_size=8, **kw), a)
    np.testing.assert_allclose(mope_scores(model, seqs, starts, batch_size=1, **kw), a,
                               rtol=0, atol=ATOL)
    b = mope_scores(model, seqs, starts, batch_size=8, pad_id=PAD, seed=8)
    assert not np.allclose(a, b, rtol=0, atol=ATOL)


def test_input_validation(models, data):
    seqs, starts = data
    model = models["gpt2"]
    with pytest.raises(ValueError, match="differ in length"):
        mope_scores(model, seqs, starts[:-1], pad_id=PAD)
    with pytest.raises(ValueError, match="score_from"):
        block_mope_scores(model, [seqs[0]], [len(seqs[0])], pad_id=PAD)


@pytest.mark.parametrize("fam", FAMILIES)
def test_block_risk_runs_on_the_tiny_presets(tok, data, fam):
    """The demo-sized presets (3 blocks): one row per block, and the clean-prefix fast path
    agrees with perturbing the block and running the whole model."""
    from kdaudit.models import build_zoo_model

    model = build_zoo_model(f"{fam}-tiny-teacher", tok, seed=0).eval()
    seqs, starts = data
    scores = block_mope_scores(model, seqs[:4], starts[:4], pad_id=PAD, sigma=0.01,
                               n_perturbations=2, seed=0, batch_size=4)
    assert scores.shape == (3, 4) and np.isfinite(scores).all()
    path = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "llama": "model.layers"}[fam]
    naive = naive_block_mope(model, path, seqs[:4], starts[:4], sigma=0.01, n=2, seed=0)
    np.testing.assert_allclose(scores, naive, atol=1e-5)
