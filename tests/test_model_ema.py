"""EMA teacher: schedules as pure functions, closed-form EMA of the student's history, fp32."""
import math

import pytest
import torch

from celljepa_dist.model import (
    CellEncoder,
    EMAConfig,
    ModelConfig,
    ema_update_,
    encoder_params,
    make_teacher,
    momentum_at,
    momentum_schedule,
)


def test_schedules_hit_their_endpoints_and_shapes():
    assert momentum_at(0, 100, "constant", 0.99) == 0.99 == momentum_at(77, 100, "constant", 0.99)
    assert momentum_at(0, 100, "linear") == pytest.approx(0.996)
    assert momentum_at(50, 100, "linear") == pytest.approx(0.998)
    assert momentum_at(100, 100, "linear") == pytest.approx(1.0)
    assert momentum_at(500, 100, "linear") == pytest.approx(1.0)  # past the end stays final
    assert momentum_at(0, 100, "cosine") == pytest.approx(0.996)
    assert momentum_at(50, 100, "cosine") == pytest.approx(0.998)
    assert momentum_at(25, 100, "cosine") == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)
    ms = [momentum_at(s, 40, "cosine") for s in range(41)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))


def test_linear_schedule_matches_ijepa_generator():
    """I-JEPA: (ema0 + i * (ema1 - ema0) / total for i in range(total + 1))."""
    total = 37
    ijepa = [0.996 + i * (1.0 - 0.996) / total for i in range(total + 1)]
    ours = momentum_schedule(EMAConfig("linear", 0.996, 1.0), total)
    assert [next(ours) for _ in range(total + 1)] == pytest.approx(ijepa)
    resumed = momentum_schedule(EMAConfig("linear", 0.996, 1.0), total, start_step=20)
    assert next(resumed) == pytest.approx(ijepa[20])


def test_schedule_validation():
    with pytest.raises(ValueError, match="schedule"):
        momentum_at(1, 10, "exp")
    with pytest.raises(ValueError, match="total_steps"):
        momentum_at(1, 0)
    with pytest.raises(ValueError, match="EMAConfig.base"):
        EMAConfig(base=1.5).validate()


def tiny_encoder():
    return CellEncoder(ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, d_hid=16, dropout=0.2))


def test_teacher_is_frozen_fp32_eval_copy():
    student = tiny_encoder().to(torch.bfloat16)
    teacher = make_teacher(student)
    assert not teacher.training
    for (name, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        assert t.dtype == torch.float32 and not t.requires_grad
        assert t.data_ptr() != s.data_ptr()
        torch.testing.assert_close(t, s.float(), msg=name)


def test_after_k_updates_teacher_equals_closed_form_ema():
    """theta_T(k) = prod_i m_i * theta_T(0) + sum_i (1 - m_i) prod_{j>i} m_j * theta_S(i)."""
    torch.manual_seed(0)
    student = tiny_encoder()
    teacher = make_teacher(student)
    t0 = [p.detach().clone().double() for p in encoder_params(teacher)]
    history, moms = [], []
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for step in range(6):
        for p in student.parameters():  # a fake optimiser step moving every parameter
            p.grad = torch.randn_like(p)
        opt.step()
        m = momentum_at(step, 6, "cosine", 0.7, 1.0)
        history.append([p.detach().clone().double() for p in encoder_params(student)])
        moms.append(m)
        ema_update_(encoder_params(teacher), encoder_params(student), m)
    for idx, t in enumerate(encoder_params(teacher)):
        want = t0[idx] * math.prod(moms)
        for i, m in enumerate(moms):
            want = want + (1 - m) * math.prod(moms[i + 1:]) * history[i][idx]
        torch.testing.assert_close(t.double(), want, atol=1e-6, rtol=1e-6)


def test_update_on_plain_tensor_lists_with_bf16_student_shards():
    """As the engine calls it on ZeRO-3 local shards: flat fp32 teacher, flat bf16 student."""
    torch.manual_seed(0)
    teacher = [torch.randn(10), torch.randn(3)]
    student = [torch.randn(10).to(torch.bfloat16), torch.randn(3).to(torch.bfloat16)]
    want = [0.9 * t + 0.1 * s.float() for t, s in zip(teacher, student)]
    ema_update_(teacher, student, 0.9)
    for t, w in zip(teacher, want):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, w)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="teacher tensors"):
        ema_update_([torch.zeros(2)], [], 0.5)


def test_fp32_teacher_moves_where_bf16_would_not():
    teacher = [torch.ones(4)]
    ema_update_(teacher, [torch.full((4,), 1.5)], 0.9999)
    assert (teacher[0] > 1.0).all()
    bf16 = torch.ones(4, dtype=torch.bfloat16)
    torch._foreach_mul_([bf16], 0.9999)
    torch._foreach_add_([bf16], [torch.full((4,), 1.5, dtype=torch.bfloat16)], alpha=1e-4)
    assert (bf16 == 1.0).all()  # the trap the fp32 teacher avoids
