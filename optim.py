"""The Muon + AdamW optimizer pair that train.py uses with --optimizer=muon."""
import math

import torch

import hardware


def newton_schulz_dtype(device_type: str) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (GPUs, CPUs with AMX/AVX512-BF16), as
    torch.optim.Muon always does; float32 elsewhere. On a CPU without native bf16 the bf16
    matmuls are emulated: on our AVX2 EPYC they made Muon's step most of a training step."""
    if device_type == "cuda" or (device_type == "cpu" and hardware.cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def orthogonalize(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (Jordan et al. 2024), in `dtype`, on a
    stack of matrices at once: g (n, A, B) -> for each, a matrix near its orthogonal factor, with
    singular values ~0.5-1.5. One batched product per stage instead of one per matrix: the same
    numbers bit for bit (each matrix's product is computed alone either way; tested against
    torch.optim.Muon), for a third of the time on the small matrices of CPU models."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(1) > g.size(2):
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if g.size(1) > g.size(2) else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in a dtype of our choice
    (newton_schulz_dtype); torch's always runs it in bf16. Same settings, same state (one
    momentum_buffer per matrix, so checkpoints move between the two), same update:
    nesterov momentum, orthogonalize, decoupled weight decay, the lr scaled per shape."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not used here"
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            same_shape: dict[tuple, list] = {}  # matrices of one shape are orthogonalized as one stack
            for p in group["params"]:
                if p.grad is not None:
                    same_shape.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for ((A, B), _, _), params in same_shape.items():
                grads = [p.grad for p in params]
                buffers = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buffers.append(state["momentum_buffer"])
                torch._foreach_lerp_(buffers, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
                updates = orthogonalize(torch.stack(updates), group["ns_coefficients"], group["ns_steps"],
                                        group["eps"], self.ns_dtype)
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    scale = 0.2 * math.sqrt(max(A, B))
                elif group["adjust_lr_fn"] in (None, "original"):
                    scale = math.sqrt(max(1, A / B))
                else:
                    scale = 1.0
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, list(updates.to(params[0].dtype).unbind(0)), alpha=-lr * scale)


class MuonAdamW:
    """Muon for the matrices inside the blocks and AdamW for the rest, stepped as one optimizer.

    Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces each
    matrix's momentum by its nearest orthogonal matrix (a few Newton-Schulz iterations), so
    every direction of the update moves at the same rate. It applies to 2-D hidden weights
    only; embeddings, the tied output head, norms and biases stay with AdamW, as in the
    reference. On the small char-level models here it reached a given loss in about half
    the steps of AdamW. The class holds both torch optimizers and shows their param_groups
    as one list, which is all train_step, the lr schedule and GradScaler use.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        # looked up each time: load_state_dict replaces the optimizers' group lists
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
