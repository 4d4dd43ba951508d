"""The Muon + AdamW optimizer pair that train.py uses with --optimizer=muon."""
import torch


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
