"""Divergences in kdaudit.train.objectives against a brute-force float64 reference, plus properties."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdaudit.train import objectives as obj
from kdaudit.train.objectives import DIVERGENCES, per_token

NAMES = ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation",
         "skew_forward_kl", "skew_reverse_kl"]

# (divergence, its parameters); an empty dict means the defaults (beta = alpha = 0.1)
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.9}),
    ("total_variation", {}),
    ("skew_forward_kl", {}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_forward_kl", {"alpha": 0.7}),
    ("skew_forward_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {"alpha": 1.0}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}" for n, p in CASES]

INF, NAN = float("inf"), float("nan")
GARBAGE = [INF, -INF, NAN, 1e30, -1e30, 3e38, 0.0]  # written into masked-out positions


# ----------------------------------------------------------------------------------------------
# brute-force reference: python floats, explicit loops, probabilities mixed in probability space

def _ref_softmax(row: list[float]) -> tuple[list[float], list[float]]:
    mx = max(row)
    lse = mx + math.log(sum(math.exp(x - mx) for x in row))
    logp = [x - lse for x in row]
    return logp, [math.exp(lp) for lp in logp]


def _ref_log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _ref_kl(a: list[float], log_a: list[float], log_b: list[float]) -> float:
    total = 0.0
    for ai, lai, lbi in zip(a, log_a, log_b):
        if ai > 0:  # 0 log 0 = 0
            total += ai * (lai - lbi)
    return total


def _ref_token(name: str, s_row: list[float], t_row: list[float], params: dict) -> float:
    logq, q = _ref_softmax(s_row)
    logp, p = _ref_softmax(t_row)
    if name == "forward_kl":
        return _ref_kl(p, logp, logq)
    if name == "reverse_kl":
        return _ref_kl(q, logq, logp)
    if name == "total_variation":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if name == "generalized_jsd":
        b = params.get("beta", 0.1)
        logm = [_ref_log(b * pi + (1 - b) * qi) for pi, qi in zip(p, q)]
        return b * _ref_kl(p, logp, logm) + (1 - b) * _ref_kl(q, logq, logm)
    a = params.get("alpha", 0.1)
    if name == "skew_forward_kl":
        logm = [_ref_log(a * pi + (1 - a) * qi) for pi, qi in zip(p, q)]
        return _ref_kl(p, logp, logm)
    if name == "skew_reverse_kl":
        logm = [_ref_log((1 - a) * pi + a * qi) for pi, qi in zip(p, q)]
        return _ref_kl(q, logq, logm)
    raise AssertionError(name)


def reference(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
              params: dict, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-token values and both reductions, computed position by position in float64."""
    s, t, m = student.double().tolist(), teacher.double().tolist(), mask.bool().tolist()
    B, T = mask.shape
    tokens = torch.zeros(B, T, dtype=torch.float64)
    total, count, per_seq = 0.0, 0, []
    for b in range(B):
        seq_total, seq_count = 0.0, 0
        for i in range(T):
            if not m[b][i]:
                continue
            v = _ref_token(name, [x / temperature for x in s[b][i]],
                           [x / temperature for x in t[b][i]], params)
            tokens[b, i] = v
            seq_total += v
            seq_count += 1
        per_seq.append(seq_total / seq_count if seq_count else 0.0)
        total += seq_total
        count += seq_count
    return {"tokens": tokens, "mean": torch.tensor(total / count if count else 0.0,
                                                   dtype=torch.float64),
            "none": torch.tensor(per_seq, dtype=torch.float64)}


# ----------------------------------------------------------------------------------------------
# data

def make_case(seed: int = 0, B: int = 3, T: int = 5, V: int = 7, garbage: bool = True):
    """Student/teacher logits mixing flat (x0.1), moderate and peaked (x8) rows, and a mask with
    an empty sequence (1) and uneven counts (3 and 4 tokens); garbage where the mask is false."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 8.0])
    student = torch.randn(B, T, V, generator=g) * scales[torch.randint(0, 3, (B, T, 1), generator=g)]
    teacher = torch.randn(B, T, V, generator=g) * scales[torch.randint(0, 3, (B, T, 1), generator=g)]
    mask = torch.ones(B, T, dtype=torch.bool)
    if B >= 3 and T >= 5:
        mask[0, [0, 3]] = False
        mask[1] = False
        mask[2, 4] = False
    if garbage:
        junk = torch.tensor([GARBAGE[i % len(GARBAGE)] for i in range(V)])
        student[~mask] = junk
        teacher[~mask] = junk.flip(0)
    return student, teacher, mask


def call(name: str, student, teacher, mask, params: dict, **kw) -> torch.Tensor:
    return DIVERGENCES[name](student, teacher, mask, **params, **kw)


# ----------------------------------------------------------------------------------------------
# agreement with the reference

@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_matches_reference_float32(name, params):
    student, teacher, mask = make_case(seed=1)
    ref = reference(name, student, teacher, mask, params)
    for reduction in ("mean", "none"):
        out = call(name, student, teacher, mask, params, reduction=reduction)
        assert out.dtype == torch.float32
        assert out.shape == ref[reduction].shape
        torch.testing.assert_close(out.double(), ref[reduction], rtol=1e-5, atol=1e-6)
    tokens = per_token(name, student, teacher, mask, **params)
    assert tokens.shape == mask.shape
    assert torch.all(tokens[~mask] == 0)
    torch.testing.assert_close(tokens.double(), ref["tokens"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_float64_stays_float64(name, params):
    student, teacher, mask = make_case(seed=3)
    student, teacher = student.double(), teacher.double()
    ref = reference(name, student, teacher, mask, params)
    for reduction in ("mean", "none"):
        out = call(name, student, teacher, mask, params, reduction=reduction)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref[reduction], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_low_precision_is_upcast(name, params):
    for dtype in (torch.bfloat16, torch.float16):
        student, teacher, mask = make_case(seed=4)
        student, teacher = student.to(dtype), teacher.to(dtype)
        # the reference sees exactly the rounded logits the function saw
        ref = reference(name, student, teacher, mask, params)
        for reduction in ("mean", "none"):
            out = call(name, student, teacher, mask, params, reduction=reduction)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref[reduction], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_temperature_divides_logits_without_rescaling(name, params):
    student, teacher, mask = make_case(seed=5)
    for temperature in (0.5, 2.0, 3.7):
        ref = reference(name, student, teacher, mask, params, temperature=temperature)
        for reduction in ("mean", "none"):
            out = call(name, student, teacher, mask, params, temperature=temperature,
                       reduction=reduction)
            torch.testing.assert_close(out.double(), ref[reduction], rtol=1e-5, atol=1e-6)


def test_mixed_precision_pair_uses_widest_dtype():
    student, teacher, mask = make_case(seed=6)
    out = obj.forward_kl(student.bfloat16(), teacher.double(), mask)
    assert out.dtype == torch.float64
    ref = reference("forward_kl", student.bfloat16(), teacher.double(), mask, {})["mean"]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_negative_infinity_vocab_padding(name, params):
    """-inf logits at counted positions (padded vocabulary entries) behave as probability 0."""
    student, teacher, mask = make_case(seed=7)
    student[..., -2:] = -INF
    teacher[..., -2:] = -INF
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    out = call(name, student, teacher, mask, params, reduction="none")
    ref = reference(name, student.detach(), teacher.detach(), mask, params)["none"]
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    for g in (student.grad, teacher.grad):  # None: that input does not enter (alpha = 1)
        assert g is None or torch.isfinite(g).all()


# reverse KL and skew reverse KL at alpha = 0 are infinite here; at alpha = 1 the student drops out
FINITE_CASES = [(c, i) for c, i in zip(CASES, CASE_IDS)
                if c[0] != "reverse_kl" and c[1].get("alpha") not in (0.0, 1.0)]


@pytest.mark.parametrize("name,params", [c for c, _ in FINITE_CASES],
                         ids=[i for _, i in FINITE_CASES])
def test_teacher_zero_probabilities(name, params):
    """Teacher puts zero mass where the student does not: finite whenever the true value is."""
    student, teacher, mask = make_case(seed=8, garbage=False)
    teacher[..., :3] = -INF
    student.requires_grad_(True)
    out = call(name, student, teacher, mask, params, reduction="mean")
    ref = reference(name, student.detach(), teacher, mask, params)["mean"]
    assert math.isfinite(ref.item())
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=1e-6)
    out.backward()
    assert torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------------------------
# properties

def test_nonnegative_and_zero_for_identical_logits():
    student, teacher, mask = make_case(seed=9)
    for name, params in CASES:
        assert (per_token(name, student, teacher, mask, **params) >= -1e-6).all(), name
        same = per_token(name, teacher, teacher.clone(), mask, **params)
        assert same.abs().max() <= 1e-6, name
        # shifting all logits of a row by a constant does not change the distribution
        shifted = per_token(name, teacher + 5.0, teacher, mask, **params)
        assert shifted[mask].abs().max() <= 1e-5, name


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, NAN])
def test_generalized_jsd_rejects_beta_outside_open_interval(bad):
    student, teacher, mask = make_case()
    with pytest.raises(ValueError, match="beta") as err:
        obj.generalized_jsd(student, teacher, mask, beta=bad)
    assert str(bad) in str(err.value)
    with pytest.raises(ValueError, match="beta"):
        per_token("generalized_jsd", student, teacher, mask, beta=bad)


@pytest.mark.parametrize("fn", [obj.skew_forward_kl, obj.skew_reverse_kl])
@pytest.mark.parametrize("bad", [-0.01, 1.01, NAN])
def test_skew_rejects_alpha_outside_unit_interval(fn, bad):
    student, teacher, mask = make_case()
    with pytest.raises(ValueError, match="alpha"):
        fn(student, teacher, mask, alpha=bad)


def test_skew_alpha_zero_is_plain_kl_and_alpha_one_is_zero():
    student, teacher, mask = make_case(seed=10)
    for reduction in ("mean", "none"):
        fwd = obj.forward_kl(student, teacher, mask, reduction=reduction)
        rev = obj.reverse_kl(student, teacher, mask, reduction=reduction)
        assert fwd.abs().max() > 1e-3  # the comparison below is not vacuous
        torch.testing.assert_close(
            obj.skew_forward_kl(student, teacher, mask, alpha=0.0, reduction=reduction), fwd)
        torch.testing.assert_close(
            obj.skew_reverse_kl(student, teacher, mask, alpha=0.0, reduction=reduction), rev)
        assert obj.skew_forward_kl(student, teacher, mask, alpha=1.0,
                                   reduction=reduction).abs().max() == 0
        assert obj.skew_reverse_kl(student, teacher, mask, alpha=1.0,
                                   reduction=reduction).abs().max() == 0


def test_skew_kl_is_smaller_than_plain_kl():
    """Mixing the target toward the other distribution shrinks the divergence (convexity)."""
    student, teacher, mask = make_case(seed=11)
    fwd = per_token("forward_kl", student, teacher, mask)
    rev = per_token("reverse_kl", student, teacher, mask)
    for alpha in (0.1, 0.5):
        assert (per_token("skew_forward_kl", student, teacher, mask, alpha=alpha)
                <= fwd + 1e-6).all()
        assert (per_token("skew_reverse_kl", student, teacher, mask, alpha=alpha)
                <= rev + 1e-6).all()


def test_total_variation_bounded_by_one():
    student, teacher, mask = make_case(seed=12)
    # nearly disjoint one-hot distributions push TV to 1
    V = student.shape[-1]
    idx = torch.arange(student.shape[0] * student.shape[1]).reshape(student.shape[:2])
    student = 100.0 * torch.nn.functional.one_hot(idx % V, V).float()
    teacher = 100.0 * torch.nn.functional.one_hot((idx + 1) % V, V).float()
    tv = per_token("total_variation", student, teacher, mask)
    assert (tv <= 1.0 + 1e-6).all()
    assert tv[mask].min() > 0.999


def test_jsd_is_bounded():
    """Generalized JSD <= the entropy bound -beta log beta - (1-beta) log(1-beta)."""
    student, teacher, mask = make_case(seed=13)
    student, teacher = 50.0 * student, 50.0 * teacher
    for beta in (0.1, 0.5, 0.9):
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (per_token("generalized_jsd", student, teacher, mask, beta=beta)
                <= bound + 1e-5).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_gradients_finite_with_garbage_at_masked_positions(name, params, dtype, reduction):
    student, teacher, mask = make_case(seed=14)
    student = student.to(dtype).requires_grad_(True)
    teacher = teacher.to(dtype).requires_grad_(True)
    out = call(name, student, teacher, mask, params, reduction=reduction)
    assert torch.isfinite(out).all()
    out.sum().backward()
    # at alpha = 1 the skew KLs are KL(p || p) and KL(q || q): one side has no gradient at all
    degenerate = name.startswith("skew") and params.get("alpha") == 1.0
    for g in (student.grad, teacher.grad):
        if g is None and degenerate:
            continue
        assert g.dtype == dtype
        assert torch.isfinite(g).all()
        assert (g[~mask] == 0).all()
    if not degenerate:  # the objective actually reaches the student
        assert student.grad[mask].abs().max() > 0


def test_gradient_matches_finite_differences():
    student, teacher, mask = make_case(seed=15, B=2, T=3, V=5, garbage=False)
    student, teacher = student.double().requires_grad_(True), teacher.double()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    for name, params in CASES:
        assert torch.autograd.gradcheck(
            lambda s: call(name, s, teacher, mask, params, reduction="none"), (student,),
            fast_mode=True)


def test_empty_mask_gives_zero():
    student, teacher, _ = make_case(seed=16)
    mask = torch.zeros(student.shape[:2], dtype=torch.bool)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    total = 0.0
    for name, params in CASES:
        mean = call(name, student, teacher, mask, params, reduction="mean")
        none = call(name, student, teacher, mask, params, reduction="none")
        assert mean.shape == () and mean.item() == 0.0
        assert none.shape == (student.shape[0],) and (none == 0).all()
        total = total + mean + none.sum()
    total.backward()
    assert (student.grad == 0).all() and (teacher.grad == 0).all()


def test_mean_weights_tokens_and_none_weights_within_sequence():
    """mean = sum over tokens / token count, not the mean of per-sequence means."""
    student, teacher, mask = make_case(seed=17)
    tokens = per_token("forward_kl", student, teacher, mask)
    mean = obj.forward_kl(student, teacher, mask)
    none = obj.forward_kl(student, teacher, mask, reduction="none")
    torch.testing.assert_close(mean, tokens.sum() / mask.sum())
    torch.testing.assert_close(none, tokens.sum(1) / mask.sum(1).clamp_min(1))
    assert not torch.isclose(mean, none[mask.any(1)].mean())


def test_integer_mask_equals_bool_mask():
    student, teacher, mask = make_case(seed=18)
    for name, params in CASES:
        for reduction in ("mean", "none"):
            a = call(name, student, teacher, mask, params, reduction=reduction)
            b = call(name, student, teacher, mask.long(), params, reduction=reduction)
            c = call(name, student, teacher, mask.float(), params, reduction=reduction)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)


def test_inputs_are_not_modified():
    student, teacher, mask = make_case(seed=19)
    student[0, 1, 2] = -INF  # the -inf handling works in place on copies only
    s0, t0, m0 = student.clone(), teacher.clone(), mask.clone()
    for name, params in CASES:
        call(name, student, teacher, mask, params, temperature=2.0)
    assert torch.equal(student.isnan(), s0.isnan()) and torch.equal(teacher.isnan(), t0.isnan())
    assert torch.equal(student.nan_to_num(), s0.nan_to_num())
    assert torch.equal(teacher.nan_to_num(), t0.nan_to_num())
    assert torch.equal(mask, m0)


# ----------------------------------------------------------------------------------------------
# API and validation

def test_registry_and_signatures():
    assert list(DIVERGENCES) == NAMES
    for name, fn in DIVERGENCES.items():
        assert fn is getattr(obj, name)
        sig = inspect.signature(fn)
        assert list(sig.parameters)[:3] == ["student_logits", "teacher_logits", "mask"]
        assert sig.parameters["temperature"].default == 1.0
        assert sig.parameters["reduction"].default == "mean"
        assert sig.parameters["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(obj.generalized_jsd).parameters["beta"].default == 0.1
    assert inspect.signature(obj.skew_forward_kl).parameters["alpha"].default == 0.1
    assert inspect.signature(obj.skew_reverse_kl).parameters["alpha"].default == 0.1


def test_module_docstring_says_no_temperature_squared():
    assert "temperature**2" in obj.__doc__ and "NOT" in obj.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_rejects_bad_arguments(name):
    student, teacher, mask = make_case()
    fn = DIVERGENCES[name]
    with pytest.raises(ValueError, match="reduction"):
        fn(student, teacher, mask, reduction="sum")
    with pytest.raises(ValueError, match="shape"):
        fn(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        fn(student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match="floating"):
        fn(student.long(), teacher.long(), mask)
    for bad in (0.0, -1.0, INF, NAN):
        with pytest.raises(ValueError, match="temperature"):
            fn(student, teacher, mask, temperature=bad)


def test_per_token_rejects_unknown_name_and_parameters():
    student, teacher, mask = make_case()
    with pytest.raises(ValueError, match="unknown divergence"):
        per_token("cross_entropy", student, teacher, mask)
    with pytest.raises(TypeError, match="beta"):
        per_token("forward_kl", student, teacher, mask, beta=0.5)


def test_per_token_without_mask_counts_every_position():
    student, teacher, _ = make_case(seed=20, garbage=False)
    full = torch.ones(student.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(per_token("reverse_kl", student, teacher),
                               per_token("reverse_kl", student, teacher, full))
    assert (per_token("reverse_kl", student, teacher) > 0).all()


# ----------------------------------------------------------------------------------------------
# random shapes

@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(2, 9),
       case=st.sampled_from(CASES), scale=st.sampled_from([0.01, 1.0, 20.0]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**16),
       mask_bits=st.integers(0, 2**15 - 1))
def test_random_shapes_match_reference(B, T, V, case, scale, temperature, seed, mask_bits):
    name, params = case
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    mask = torch.tensor([[bool(mask_bits >> (b * T + i) & 1) for i in range(T)]
                         for b in range(B)])
    student[~mask] = NAN
    teacher[~mask] = INF
    ref = reference(name, student, teacher, mask, params, temperature)
    for reduction in ("mean", "none"):
        out = call(name, student, teacher, mask, params, temperature=temperature,
                   reduction=reduction)
        torch.testing.assert_close(out, ref[reduction], rtol=1e-9, atol=1e-12)
        assert (out >= -1e-12).all()
