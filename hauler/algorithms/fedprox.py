"""FedProx (Li et al. 2020): local training pulled towards the round's global model.

Each site minimises its loss plus the proximal term mu/2 ||w - w_g||^2, where w_g is the global
model it received: `FedProx.term()` adds it to a loss (autograd then adds mu (w - w_g) to the
gradients), or `FedProx.correct()`, called after each backward, adds that gradient directly
without growing the autograd graph. w_g is read from the site's received model file through the
tensors `hauler.receive("torch")` returns, never copied, so the script must train a network
loaded from them (`net.load_state_dict(model)`), not the received tensors themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hauler.core.errors import ConfigError


class FedProx:
    """The proximal term of one round: `net` trained from `global_model` (the received tensors)."""

    def __init__(self, net: Any, global_model: Mapping[str, Any], *, mu: float) -> None:
        if not mu >= 0:
            raise ConfigError(f"FedProx needs mu >= 0 (0 is plain FedAvg), got {mu}")
        self.mu = mu
        self._pairs = [(w, global_model[name]) for name, w in net.named_parameters()]

    def term(self) -> Any:
        """mu/2 * sum ||w - w_g||^2 over the network's parameters: add it to the loss."""
        total = sum(((w - w_g.to(w.device)).square().sum() for w, w_g in self._pairs), start=0.0)
        return self.mu / 2 * total

    def correct(self) -> None:
        """grad <- grad + mu (w - w_g) for every parameter: call it after backward, before the
        optimizer's step (the term's gradient, instead of adding the term to the loss)."""
        for w, w_g in self._pairs:
            if w.grad is not None:
                w.grad.add_(w.detach(), alpha=self.mu).sub_(w_g.to(w.device), alpha=self.mu)

    def update(self) -> dict[str, Any]:
        """What FedProx adds to the upload: nothing, the model is sent alone."""
        return {}
