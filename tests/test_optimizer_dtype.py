"""--optimizer-dtype measured: AdamW moments in a dtype other than the parameters' (StateDtypeAdam)."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.params import parameter_sizes_in_order  # noqa: E402
from memcalc.estimate.training import estimate_training  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.validate.run import StateDtypeAdam, TrainWorkload, measure_training  # noqa: E402

RECIPES = [("mixed-bf16", "bf16"), ("pure-bf16", "fp32")]


@pytest.fixture(scope="module")
def llama():
    return replace(resolve_model("llama-3.2-1b"), num_layers=2)


@pytest.mark.parametrize(("precision", "optimizer_dtype"), RECIPES)
def test_state_dtype_matches_the_estimate(llama, precision, optimizer_dtype):
    settings = dict(precision=precision, optimizer_dtype=optimizer_dtype, seq_len=128, batch_size=2)
    estimate = estimate_training(llama, TrainSettings(**settings))
    measured = measure_training(llama, TrainWorkload(**settings), "fake")
    sizes = parameter_sizes_in_order(llama)
    state_bytes = {"bf16": 2, "fp32": 4}[optimizer_dtype]
    steps = 4 * len(sizes)  # one fp32 step counter per tensor, which the estimate leaves out
    assert measured.components["optimizer_states"] == 2 * state_bytes * sum(sizes) + steps
    assert estimate.component("optimizer_states").bytes == measured.components["optimizer_states"] - steps
    # the step: the input ids and labels (2 x batch x seq int64 = 4,096 bytes) are still alive
    tokens = 2 * 2 * 128 * 8
    assert measured.components["optimizer_step_temporaries"] - tokens == estimate.component(
        "optimizer_step_temporaries").bytes
    # the step phase sets the total; beyond the estimate: the tokens, the step counters and the
    # 128-byte rotary inv_freq buffer the measured weights hold
    assert measured.total == measured.phases["optimizer_step"].peak_bytes
    assert measured.total - estimate.total == tokens + steps + 128


def test_moments_take_the_state_dtype_and_update_like_torch():
    """On real CPU tensors: bf16 moments beside fp32 parameters, fp32 beside bf16 parameters; with the
    parameters' own dtype the update equals torch's foreach AdamW."""
    torch.manual_seed(0)
    for param_dtype, state_dtype in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        param = torch.randn(8, 4, dtype=param_dtype, requires_grad=True)
        param.grad = torch.randn_like(param)
        optimizer = StateDtypeAdam([param], state_dtype)
        optimizer.step()
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state_dtype
        assert state["step"].dtype == torch.float32 and param.dtype == param_dtype
    reference = torch.randn(16, 8, requires_grad=True)
    ours = reference.detach().clone().requires_grad_(True)
    torch_adamw = torch.optim.AdamW([reference], lr=1e-3, foreach=True)
    state_adamw = StateDtypeAdam([ours], torch.float32, lr=1e-3)
    for _ in range(3):
        reference.grad = torch.randn_like(reference)
        ours.grad = reference.grad.clone()
        torch_adamw.step()
        state_adamw.step()
    torch.testing.assert_close(ours, reference)


def test_run_training_validation_measures_optimizer_dtype(llama):
    """``memcalc validate`` has no --optimizer-dtype option yet: its support function is called."""
    from memcalc.validate.cli_support import run_training_validation

    settings = TrainSettings(precision="pure-bf16", optimizer_dtype="fp32", seq_len=128, batch_size=2)
    comparison = run_training_validation(llama, settings, estimate_training(llama, settings), "fake", False)
    rows = {row.key: row for row in comparison.rows}
    assert rows["optimizer_states"].measured - rows["optimizer_states"].estimated == 4 * 20  # step counters
    assert comparison.total.measured - comparison.total.estimated == 2 * 2 * 128 * 8 + 4 * 20 + 128


@pytest.mark.parametrize("changes", [dict(optimizer="sgd"), dict(optimizer_impl="fused")])
def test_run_training_validation_refuses_other_optimizers_with_a_state_dtype(llama, changes):
    from memcalc.errors import InputError
    from memcalc.validate.cli_support import run_training_validation

    settings = TrainSettings(optimizer_dtype="bf16", seq_len=128, batch_size=2, **changes)
    with pytest.raises(InputError, match="--optimizer-dtype is measured for"):
        run_training_validation(llama, settings, estimate_training(llama, settings), "fake", False)
