"""hello-lm's model: a small GPT over bytes (vocabulary 256, no tokenizer), its output
projection tied to its token embedding as GPT-2's is, and its initial weights.

`layout` comes from `hauler.layout_of`, which lists `lm_head.weight` as tied to `wte.weight`:
Hauler stores, sends and averages that matrix once and hands it back tied.
"""

import functools
import json

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import hauler

VOCAB = 256  # bytes


class Block(nn.Module):
    """Pre-norm attention and MLP, each added to the residual stream."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; `lm_head` is the token embedding `wte` itself."""

    def __init__(self, d_model: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.wte, self.wpe = nn.Embedding(VOCAB, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix, two names in the state_dict
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next byte at every position of `tokens` (batch, length)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per byte) of predicting each window's bytes from the ones
        before: `windows` is (batch, context + 1) of uint8 or int64."""
        windows = windows.long()
        logits = self(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases (LayerNorms keep 1 and 0)."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build(config: dict) -> GPT:
    """A network of the shape `config` ([model] config in job.toml) gives, not initialised
    from the seed (its weights are about to be overwritten)."""
    return GPT(
        int(config.get("d_model", 192)),
        int(config.get("layers", 4)),
        int(config.get("heads", 4)),
        int(config.get("context", 128)),
    )


def initial(config: dict) -> GPT:
    """The same initial network on every call: the seed fixes every weight."""
    torch.manual_seed(int(config.get("seed", 0)))
    return build(config)


def layout(config: dict) -> list[tuple]:
    return hauler.layout_of(initial(config).state_dict())


def fill(name: str, out: np.ndarray, config: dict) -> None:
    """Called once per stored tensor, so the network is built once and kept."""
    out[...] = _initial_state(json.dumps(config, sort_keys=True))[name].numpy()


@functools.lru_cache(maxsize=1)
def _initial_state(config_json: str) -> dict[str, torch.Tensor]:
    return initial(json.loads(config_json)).state_dict()
