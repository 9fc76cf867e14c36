"""Optimizers of pretraining and fine-tuning: AdamW (fused where the device supports it) and a small LAMB for
ZeRO stage 0.

DeepSpeed's FusedLamb needs CUDA and LAMB's per-tensor trust ratios do not survive ZeRO's flattened partitions,
so LAMB is a plain torch optimizer here and the config rejects it with ZeRO >= 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bertscale.config import TrainConfig
from bertscale.train import deepspeed_engine

log = logging.getLogger(__name__)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam's update rescaled per tensor by ||w|| / ||update|| (trust ratio).

    Bias correction as in the paper's reference implementation; the trust ratio is 1 where either norm is 0
    (freshly zeroed biases would otherwise never move).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group, beta1, beta2)
        return loss

    def _update(self, p: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        grad = p.grad.float()
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** state["step"])
        v_hat = v / (1 - beta2 ** state["step"])
        update = m_hat / (v_hat.sqrt() + group["eps"])
        if group["weight_decay"]:
            update.add_(p.float(), alpha=group["weight_decay"])
        w_norm, u_norm = p.float().norm(), update.norm()
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        p.add_((update * trust).to(p.dtype), alpha=-group["lr"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases/LayerNorm (BERT never decays those)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_supported(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch's fused AdamW runs on this device and dtype (tried on a 1-element tensor)."""
    try:
        p = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
        return True
    except (RuntimeError, TypeError, NotImplementedError) as e:
        log.debug("fused AdamW unavailable on %s/%s: %s", device, dtype, e)
        return False


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer and its hyper-parameters; pretraining reads them from `train`, fine-tuning from a task's."""

    lr: float
    weight_decay: float
    kind: Literal["adamw", "lamb"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6

    @classmethod
    def from_train(cls, train: TrainConfig) -> OptimizerSpec:
        return cls(train.lr, train.weight_decay, train.optimizer, tuple(train.betas), train.eps)


def build_optimizer(model: nn.Module, spec: OptimizerSpec | TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The optimizer of both pretraining and fine-tuning, also the client optimizer handed to DeepSpeed. Under
    ZeRO its param groups are replaced by flat fp32 partitions, which is why AdamW is probed with fp32: that is
    the dtype it will step."""
    s = OptimizerSpec.from_train(spec) if isinstance(spec, TrainConfig) else spec
    groups = param_groups(model, s.weight_decay)
    if s.kind == "lamb":
        return Lamb(groups, lr=s.lr, betas=s.betas, eps=s.eps)
    if fused_adamw_supported(device):
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, fused=True)
    if device.type == "cpu":
        return deepspeed_engine.cpu_adam(groups, lr=s.lr, betas=s.betas, eps=s.eps)
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps)
