"""The training engine's pure parts: DeepSpeed config building, step statistics, NaN counting, optimizers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bertscale.config import PipelineConfig, TrainConfig
from bertscale.errors import BertscaleError, ConfigError
from bertscale.train.deepspeed_engine import build_ds_config
from bertscale.train.loop import BadSteps
from bertscale.train.metrics import STATS, Throughput, micro_stats, step_metrics, truncate_steps
from bertscale.train.optim import Lamb, build_optimizer, param_groups


def test_ds_config_merges_our_fields_over_the_stage_file():
    t = TrainConfig(zero_stage=3, micro_batch_size=4, grad_accum=2, grad_clip=0.5, precision="bf16")
    ds = build_ds_config(t, world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False  # from zero3.json
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_ds_config_fp16_needs_a_gpu_and_custom_base_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_ds_config(TrainConfig(precision="fp16"), 1, on_gpu=False)
    assert build_ds_config(TrainConfig(precision="fp16"), 1, on_gpu=True)["fp16"]["loss_scale"] == 0
    with pytest.raises(ConfigError, match="does not exist"):
        build_ds_config(TrainConfig(ds_config=str(tmp_path / "nope.json")), 1, on_gpu=False)
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}, "steps_per_print": 7}))
    ds = build_ds_config(TrainConfig(zero_stage=2, ds_config=str(custom)), 1, on_gpu=False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["steps_per_print"] == 7


def test_lamb_with_zero_is_rejected_by_config():
    with pytest.raises(ValueError, match="lamb"):
        PipelineConfig.model_validate({"train": {"optimizer": "lamb", "zero_stage": 1}})


def _output(loss: float) -> SimpleNamespace:
    t = torch.tensor
    return SimpleNamespace(loss=t(loss), mlm_loss=t(loss - 0.5), nsp_loss=t(0.5), mlm_correct=t(3),
                           mlm_count=t(10), nsp_correct=t(1), nsp_count=t(2))


def test_micro_stats_and_step_metrics():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), "input_ids": torch.zeros(2, 4)}
    s = micro_stats(_output(2.0), batch)
    assert s.dtype == torch.float64 and len(s) == len(STATS)
    assert s[0] == 0 and s[1] == 2.0 and s[STATS.index("real_tokens")] == 5
    m = step_metrics(s + micro_stats(_output(4.0), batch), count=2)
    assert m["loss"] == pytest.approx(3.0) and m["mlm_acc"] == pytest.approx(0.3) and m["nsp_acc"] == 0.5
    assert m["real_tokens"] == 10
    bad = micro_stats(_output(float("nan")), batch)
    assert bad[0] == 1 and bad[1] == 0.0  # a NaN never pollutes the sums


def test_bad_steps_resets_on_a_good_step_and_aborts_after_the_limit():
    bad = BadSteps(limit=3)
    for flag in (True, True, False, True, True):
        bad.record(flag, "x")
    assert bad.total == 4 and bad.in_a_row == 2
    with pytest.raises(BertscaleError, match="3 consecutive non-finite"):
        bad.record(True, "step 9")


def test_throughput_mfu():
    meter = Throughput(flops_per_token=1e6, peak_flops=1e9)
    meter.add(tokens=500.0, sequences=5.0)
    out = meter.flush()
    assert out["tokens_per_s"] > 0 and out["mfu"] == pytest.approx(out["tokens_per_s"] * 1e6 / 1e9)
    tps, mfu = meter.overall()
    assert tps == pytest.approx(out["tokens_per_s"]) and mfu == pytest.approx(out["mfu"])
    assert "mfu" not in Throughput(1e6, None).flush()


def test_truncate_steps_keeps_only_steps_up_to_the_resume_point(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    truncate_steps(path, 4)  # resumed from the checkpoint taken after 4 updates
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_param_groups_exclude_biases_and_layernorm_from_decay():
    model = nn.Sequential()
    model.add_module("dense", nn.Linear(4, 4))
    model.add_module("LayerNorm", nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_lamb_step_matches_the_formula():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.1, -0.2])
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    opt.step()
    # First step: m_hat = g, v_hat = g^2, so the Adam update is sign(g) (up to eps); ||w|| = 5, ||u|| = sqrt(2).
    update = torch.tensor([1.0, -1.0])
    expected = torch.tensor([3.0, 4.0]) - 0.1 * (5 / math.sqrt(2)) * update
    assert torch.allclose(w.detach(), expected, atol=1e-4)


def test_build_optimizer_picks_lamb_or_adamw():
    model = nn.Linear(3, 3)
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="lamb", zero_stage=0), torch.device("cpu")), Lamb)
    opt = build_optimizer(model, TrainConfig(lr=3e-4), torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == 3e-4


def test_time_budget_and_checkpoint_minutes_raise_the_control_flags():
    import time as _time

    from bertscale.train.loop import Trainer
    from bertscale.train.signals import StopSignal

    now = _time.monotonic()
    trainer = SimpleNamespace(t=TrainConfig(max_minutes=1.0, checkpoint_minutes=0.5))
    assert Trainer.control(trainer, StopSignal(), now, now) == (False, False, False)
    assert Trainer.control(trainer, StopSignal(), now - 61, now - 31) == (False, True, True)
    stop = StopSignal()
    stop.received = 15
    assert Trainer.control(SimpleNamespace(t=TrainConfig()), stop, now, now) == (True, False, False)


# ----------------------------------------------------------------------------------------------------------------
# Peer failures and elastic restarts
# ----------------------------------------------------------------------------------------------------------------
GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[10.77.0.2]:5011. This is typically caused by a remote worker crashing.")
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv"


def test_communication_failures_are_classified():
    from bertscale.train.distributed import classify_comm_error

    assert classify_comm_error(RuntimeError(GLOO_CLOSED)) == "lost"
    assert classify_comm_error(RuntimeError(GLOO_TIMEOUT)) == "timeout"
    assert classify_comm_error(RuntimeError("Read error [10.77.0.1]:5011: Network is unreachable")) == "lost"
    assert classify_comm_error(RuntimeError("shape mismatch in matmul")) is None
    assert classify_comm_error(ValueError(GLOO_CLOSED)) is None


def test_peer_failure_becomes_one_clear_line_naming_the_peer():
    from bertscale.train.distributed import EXIT_PEER_LOST, DistEnv, PeerLostError, peer_failure

    env = DistEnv(rank=0, world_size=2)
    with pytest.raises(PeerLostError) as err, peer_failure(env, ["10.77.0.1", "10.77.0.2"], lambda: "step 12", 20,
                                                           lambda: "resume with the same command"):
        raise RuntimeError(GLOO_TIMEOUT)
    assert str(err.value) == ("rank 1 at 10.77.0.2 stopped responding during step 12 (collective timed out after "
                              "20 s); resume with the same command")
    assert err.value.exit_code == EXIT_PEER_LOST
    four = DistEnv(rank=3, world_size=4)
    with pytest.raises(PeerLostError, match=r"^rank 1 at 10.77.0.2 was lost during step 3 \(connection failed: "
                       r"Connection closed by peer \[10.77.0.2\]:5011\)"), \
            peer_failure(four, ["10.77.0.1", "10.77.0.2", "10.77.0.1", "10.77.0.3"], lambda: "step 3", 5, lambda: "x"):
        raise RuntimeError(GLOO_CLOSED)
    with pytest.raises(RuntimeError, match="shape"), peer_failure(env, [], lambda: "", 1, lambda: ""):
        raise RuntimeError("shape mismatch")  # a bug stays a traceback


@pytest.mark.parametrize(("position", "old", "new", "expected"), [(48, 2, 1, 96), (96, 1, 2, 48), (10, 3, 2, 15)])
def test_loader_position_is_resplit_over_a_new_world_size(position, old, new, expected):
    from bertscale.train.resume import reshard_loader_state

    state = {"epoch": 2, "position": position, "seed": 7, "world_size": old, "collator": {"rng": 1}}
    got = reshard_loader_state(state, old, new)
    assert got == {"epoch": 2, "position": expected, "seed": 7, "world_size": new, "collator": None}
    assert got["position"] * new <= position * old  # never skips data, at most re-reads fewer than `new`
