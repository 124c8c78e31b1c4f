"""While the thread governor runs a process below its starting thread count, what it computes
keeps the starting count's bits (`kdaudit.thread_invariance`): LayerNorm's weight gradients
and attention over short queries, the two CPU operators that would otherwise change. Each test
also shows the native operators do differ, so it would catch the emulation switched off."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kdaudit import thread_invariance
from kdaudit.config import KDConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.template import encode_record, format_text
from kdaudit.models import build_zoo_model, train_tokenizer
from kdaudit.train import loop
from kdaudit.train.methods import METHODS, method_params

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")


@pytest.fixture
def two_threads():
    """Torch at 2 threads (xdist workers start at 1) and the module uninstalled afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    thread_invariance.uninstall()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([format_text(r) for r in generate_records(200, seed=31)], 300)


def _layer_norm_grads(rows: int, width: int = 48):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=gen, requires_grad=True)
    w = torch.randn(width, generator=gen, requires_grad=True)
    b = torch.randn(width, generator=gen, requires_grad=True)
    F.layer_norm(x, (width,), w, b).pow(2).sum().backward()
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("rows", [1, 2, 3, 37, 2560])
def test_layer_norm_grads_at_one_thread_are_those_of_two(two_threads, rows):
    native = _layer_norm_grads(rows)
    assert thread_invariance.install(2)
    torch.set_num_threads(1)
    kept = _layer_norm_grads(rows)
    assert all(torch.equal(a, b) for a, b in zip(native, kept))
    if rows == 2560:        # the control: the native op at one thread differs
        thread_invariance.uninstall()
        plain = _layer_norm_grads(rows)
        assert torch.equal(plain[0], native[0]) and not torch.equal(plain[1], native[1])


def test_the_layer_norm_emulation_checks_itself_and_the_split_matters(two_threads):
    assert thread_invariance.reproduces_native(2)
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(2560, 48, generator=gen), torch.randn(2560, 48, generator=gen)
    w, b = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [48], w, b, 1e-5)
    native = torch.ops.aten.native_layer_norm_backward(dy, x, [48], mean, rstd, w, b,
                                                       [False, True, True])[1]
    args = (dy, x, [48], mean, rstd, w, b, [False, True, True])
    assert torch.equal(thread_invariance.weight_grads_as(2, *args)[0], native)
    assert not torch.equal(thread_invariance.weight_grads_as(3, *args)[0], native)
    with pytest.raises(ValueError, match="while torch runs 2 threads"):
        torch.set_num_threads(1)
        thread_invariance.reproduces_native(2)


def _decode_step():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(16, 4, 1, 32, generator=gen)
    k, v = (torch.randn(16, 4, 61, 32, generator=gen) for _ in range(2))
    return F.scaled_dot_product_attention(q, k, v)


def test_short_query_attention_at_one_thread_is_that_of_two(two_threads):
    native = _decode_step()
    torch.set_num_threads(1)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":   # measured there (2026-12-04)
        assert not torch.equal(_decode_step(), native)         # the control
    torch.set_num_threads(2)
    assert thread_invariance.install(2)
    torch.set_num_threads(1)
    assert torch.equal(_decode_step(), native)
    assert torch.get_num_threads() == 1                 # and the count is given back


def _train(tok, family: str, method: str, tmp_path, flip: bool):
    """A few steps of `method` on the smoke zoo pair; with `flip`, torch alternates between
    2 and 1 threads from step to step (on-policy sampling included)."""
    examples = [encode_record(r, tok, 72) for r in generate_records(24, seed=32)]
    student = build_zoo_model(f"{family}-smoke-student", tok, seed=0)
    teacher = build_zoo_model(f"{family}-smoke-teacher", tok, seed=1).eval()
    torch.set_num_threads(2)

    def alternate(step, record):
        if flip:
            torch.set_num_threads(1 if torch.get_num_threads() == 2 else 2)

    params = method_params(METHODS[method], KDConfig(max_new_tokens=12, lm_coef=0.0))
    loop.train(loop.TrainJob(student, examples, METHODS[method], TrainConfig(
        epochs=1, batch_size=6, lr=3e-3, grad_clip=1.0), out_dir=tmp_path / f"{method}{flip}",
        seed=0, pad_id=tok.pad_token_id, teacher=teacher, params=params, desc=None,
        callbacks=[alternate], max_length=96))
    return [p.detach().clone() for p in student.parameters()]


@pytest.mark.parametrize("family,method", [("gpt2", "kd"), ("gpt2", "minillm"),
                                           ("opt", "gkd"), ("llama", "kd")])
def test_students_train_to_the_same_bits_while_the_thread_count_flips(
        two_threads, tok, tmp_path, family, method):
    steady = _train(tok, family, method, tmp_path, flip=False)
    assert thread_invariance.install(2)
    flipped = _train(tok, family, method, tmp_path, flip=True)
    assert all(torch.equal(a, b) for a, b in zip(steady, flipped))
    if family == "gpt2":    # the control: without the module the flips change the weights
        thread_invariance.uninstall()
        plain = _train(tok, family, method, tmp_path, flip=True)
        assert not all(torch.equal(a, b) for a, b in zip(steady, plain))


@pytest.mark.slow
def test_a_run_writes_the_same_tables_while_its_thread_count_flips(tmp_path):
    """The whole pipeline (teacher, nokd, minillm's on-policy sampling, every audit) with the
    governor switching between 2 threads and 1 every 50 ms, against the same run at a fixed
    2 threads: every table and score file byte-identical."""
    from small_smoke import CONFIG

    (tmp_path / "run.toml").write_text('methods = ["nokd", "minillm"]\n' + CONFIG)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    args = ["run", "--preset", "smoke", "--config", str(tmp_path / "run.toml"), "--out"]
    here = os.path.dirname(__file__)
    runs = {"fixed": [sys.executable, "-m", "kdaudit", *args, str(tmp_path / "out-fixed")],
            "flip": [sys.executable, os.path.join(here, "flip_threads.py"), *args,
                     str(tmp_path / "out-flip")]}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**env, "KDAUDIT_CACHE": str(tmp_path / name),
                                                    "KDAUDIT_THREADS": "adaptive" if name == "flip"
                                                    else "fixed"})
             for name, cmd in runs.items()}     # side by side, each with its own base cache
    outputs = {name: p.communicate(timeout=600) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outputs[name][0]}\n{outputs[name][1]}"
    switches = outputs["flip"][1].count("[threads] ")
    assert switches >= 50, outputs["flip"][1][-2000:]

    def files(run: str) -> dict[str, bytes]:
        root = tmp_path / f"out-{run}" / "smoke"
        return {str(p.relative_to(root)): p.read_bytes()
                for sub in ("tables", "scores") for p in (root / sub).rglob("*") if p.is_file()}

    fixed, flipped = files("fixed"), files("flip")
    assert sorted(fixed) == sorted(flipped) and any(n.startswith("tables/") for n in fixed)
    assert [n for n in fixed if fixed[n] != flipped[n]] == []
