"""DP-SGD in the one loop: Poisson batches, the solved noise, the ε spent, three families."""
from __future__ import annotations

import json

import pytest
import torch

from kdaudit.config import ConfigError, DPConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.dp.dpsgd import plan as dp_plan
from kdaudit.dp.accounting import account
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.train import dp as dpsgd, loop
from kdaudit.train.methods import METHODS


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=31)], 300)
    examples = [encode_record(r, tok, 64) for r in generate_records(48, seed=32)]
    return tok, examples


def _log(path):
    """A DP run's training log: beside the model folder (private), never in it."""
    assert not (path / "train_log.jsonl").exists()
    return [json.loads(x) for x in loop.private_log_path(path).read_text().splitlines()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dp_teacher_fine_tunes_with_poisson_batches(setup, tmp_path, family):
    tok, examples = setup
    model = build_zoo_model(f"{family}-smoke-student", tok, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, log_every=1)
    result = loop.train(loop.TrainJob(
        model, examples, METHODS["sft"], cfg, out_dir=tmp_path / "m", seed=0,
        pad_id=tok.pad_token_id, desc=None, tokenizer=tok,
        dp=dp_plan(len(examples), 8, 2, DPConfig(epsilon=4.0, max_grad_norm=1.0))))
    sizes = [r["batch_size"] for r in _log(tmp_path / "m") if "batch_size" in r]
    assert len(set(sizes)) > 1                       # Poisson: batch sizes vary
    q = 8 / 48
    assert result.steps == round(2 / q)
    privacy = json.loads((tmp_path / "m" / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert privacy["delta"] == pytest.approx(1 / 480)
    direct = account(privacy["noise_multiplier"], q, result.steps, 1 / 480)
    assert privacy["epsilon"] == pytest.approx(direct.epsilon, rel=1e-9)
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_without_noise_and_clipping_a_dp_step_is_an_sgd_step(setup):
    tok, examples = setup
    batch_ids = list(range(6))
    from kdaudit.train.batching import collate

    b = collate([examples[i] for i in batch_ids], tok.pad_token_id)
    ref = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    ref.train()
    loss = dpsgd.per_sequence_ce(ref(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                     position_ids=b.position_ids).logits, b.input_ids,
                                 b.target_mask)
    loss.backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

    model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = dpsgd.DPPlan(noise_multiplier=0.0, sample_rate=6 / 48, steps=1, delta=1e-3,
                        max_grad_norm=1e6)
    module, dp_opt, _, _ = dpsgd.make_private(model, opt, 48, plan, seed=0)
    loss = dpsgd.per_sequence_ce(module(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                        position_ids=b.position_ids).logits, b.input_ids,
                                 b.target_mask)
    loss.backward()
    dp_opt.pre_step()   # clip (a no-op at this norm) and average over the expected batch
    for name, p in module._module.named_parameters():
        if name in want:   # Opacus averages by the expected batch size, 6 here
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gpt2_per_sample_gradients_are_each_example_s_own(setup):
    """GPT-2's Conv1D layers get their per-sample gradients from kdaudit's grad sampler (not
    Opacus's functorch fallback), and each example's equals the gradient of its loss alone."""
    from opacus import GradSampleModule
    from transformers.pytorch_utils import Conv1D

    from kdaudit.train.batching import collate

    tok, examples = setup
    b = collate(examples[:3], tok.pad_token_id)
    model = build_zoo_model("gpt2-smoke-student", tok, seed=0).train()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert layers

    def loss_of(net, rows):
        logits = net(input_ids=b.input_ids[rows], attention_mask=b.attention_mask[rows],
                     position_ids=b.position_ids[rows]).logits
        return dpsgd.per_sequence_ce(logits, b.input_ids[rows], b.target_mask[rows])

    alone = []
    for i in range(3):
        model.zero_grad()
        loss_of(model, slice(i, i + 1)).backward()
        alone.append({(n, k): p.grad.clone() for n, m in layers.items()
                      for k, p in m.named_parameters()})
    dpsgd.register_grad_samplers()
    assert Conv1D in GradSampleModule.GRAD_SAMPLERS
    model.zero_grad()
    module = GradSampleModule(model, loss_reduction="mean")
    loss_of(module, slice(0, 3)).backward()
    for (n, k), _ in alone[0].items():
        per_sample = getattr(layers[n], k).grad_sample
        for i in range(3):
            torch.testing.assert_close(per_sample[i], alone[i][n, k], rtol=1e-4, atol=1e-6,
                                       msg=f"{n}.{k}, example {i}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_dp_backward_to_the_embeddings_gives_the_full_backward_s_per_sample_gradients(
        setup, family):
    """The DP backward pass asks autograd for the embedding weights only (`graph_roots`):
    every parameter's per-sample gradients are those of the full backward, bit for bit, and
    the batch gradients of the other weights, which Opacus discards, are not computed."""
    from opacus import GradSampleModule

    from kdaudit.train.batching import collate

    tok, examples = setup
    b = collate(examples[:4], tok.pad_token_id)
    dpsgd.register_grad_samplers()
    module = GradSampleModule(build_zoo_model(f"{family}-smoke-student", tok, seed=0).train(),
                              loss_reduction="mean")

    def per_sample(inputs):
        module.zero_grad(set_to_none=True)
        logits = module(input_ids=b.input_ids, attention_mask=b.attention_mask,
                        position_ids=b.position_ids).logits
        dpsgd.per_sequence_ce(logits, b.input_ids, b.target_mask).backward(inputs=inputs)
        dpsgd.check_per_sample_grads(module.named_parameters())
        return {n: (p.grad_sample.clone(), p.grad) for n, p in module.named_parameters()}

    roots = dpsgd.graph_roots(module)
    assert roots and all(r.requires_grad for r in roots)
    full, to_roots = per_sample(None), per_sample(roots)
    assert full.keys() == to_roots.keys()
    for name, (g, _) in full.items():
        assert torch.equal(to_roots[name][0], g), name
    skipped = [n for n, (_, grad) in to_roots.items() if grad is None]
    assert len(skipped) >= len(full) - 2, skipped      # only the embeddings' batch gradients


def test_a_layer_off_the_path_to_the_embeddings_is_named(setup):
    """Negative control of the DP backward to the embeddings: a trainable layer whose input
    does not come from the embeddings gets no per-sample gradient, and the check names it."""
    from opacus import GradSampleModule

    from kdaudit.train.batching import collate

    tok, examples = setup
    b = collate(examples[:4], tok.pad_token_id)

    class WithBias(torch.nn.Module):     # a learned per-example offset from a constant input
        def __init__(self):
            super().__init__()
            self.lm = build_zoo_model("gpt2-smoke-student", tok, seed=0)
            self.offset = torch.nn.Linear(3, 1)

        def forward(self, input_ids, **kw):
            logits = self.lm(input_ids=input_ids, **kw).logits
            return logits + self.offset(torch.ones(len(input_ids), 3))[:, :, None]

    dpsgd.register_grad_samplers()
    module = GradSampleModule(WithBias().train(), loss_reduction="mean")

    def loss():
        logits = module(input_ids=b.input_ids, attention_mask=b.attention_mask,
                        position_ids=b.position_ids)
        return dpsgd.per_sequence_ce(logits, b.input_ids, b.target_mask)

    loss().backward(inputs=dpsgd.graph_roots(module))
    with pytest.raises(RuntimeError, match=r"no per-sample gradient for _module\.offset\.weight"):
        dpsgd.check_per_sample_grads(module.named_parameters())
    module = GradSampleModule(WithBias().train(), loss_reduction="mean")
    loss().backward()                   # the full backward reaches it
    dpsgd.check_per_sample_grads(module.named_parameters())


def test_opt_is_refused_with_the_reason(setup, tmp_path):
    tok, examples = setup
    with pytest.raises(ValueError, match="not available for opt models: its decoder layers"):
        loop.train(loop.TrainJob(
            build_zoo_model("opt-smoke-student", tok), examples, METHODS["sft"], TrainConfig(),
            out_dir=tmp_path / "x", seed=0, pad_id=tok.pad_token_id, desc=None,
            dp=dp_plan(len(examples), 16, 1.0, DPConfig())))


def test_dp_config_is_checked_and_sampling_methods_are_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="dp.epsilon"):
        DPConfig(epsilon=0)
    tok, examples = setup
    with pytest.raises(ValueError, match="DP-SGD supports"):   # its data is written in training
        loop.train(loop.TrainJob(
            build_zoo_model("gpt2-smoke-student", tok), examples, METHODS["gkd"], TrainConfig(),
            out_dir=tmp_path / "x", seed=0, pad_id=tok.pad_token_id,
            teacher=build_zoo_model("gpt2-smoke-teacher", tok), desc=None,
            dp=dp_plan(len(examples), 16, 1.0, DPConfig())))


def test_an_empty_poisson_batch_still_adds_noise(setup):
    tok, _ = setup
    for sigma, moves in ((0.0, False), (1.0, True)):
        model = build_zoo_model("gpt2-smoke-student", tok, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        plan = dpsgd.DPPlan(noise_multiplier=sigma, sample_rate=0.1, steps=1, delta=1e-3,
                            max_grad_norm=1.0)
        module, dp_opt, _, _ = dpsgd.make_private(model, opt, 40, plan, seed=0)
        dpsgd.noise_only_step(dp_opt)
        changed = any(not torch.equal(a, b) for a, b in zip(before, module._module.parameters()))
        assert changed == moves
