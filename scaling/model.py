"""NanoTransformer: a small pre-LayerNorm GPT-style decoder (after nanoGPT's model.py).

Token + learned position embeddings, ``n_layers`` blocks of (LayerNorm → causal self-attention via
``F.scaled_dot_product_attention``) and (LayerNorm → 4x GELU MLP) with residuals, a final LayerNorm and
an output head tied to the token embedding. No biases in linear layers. Dropout (``ModelConfig.dropout``,
off by default) acts on the embeddings, the attention weights and both residual branches while training;
off, the forward pass is deterministic, and on, it draws from the RNG states a checkpoint keeps, so a
resumed run reproduces an uninterrupted one either way.

Parameter count: ``n_layers * (12 d² + 4 d) + V d + T d + 2 d`` (~206K for phase 2, ~822K for 2.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaling.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        # Attention runs outside autocast, in q/k/v's own dtype (the projection's output: bf16 under bf16
        # autocast, what autocast would cast them to anyway). Under torch.func's grad (the noise
        # measurement) autocast reaches into SDPA's math kernel, whose fp32 upcast of bf16 inputs then
        # meets bf16 tensors in the backward ("expected scalar type Float but found BFloat16").
        with torch.autocast(x.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        return _dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        # GPT-2's scaled init of the projections into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, vocab) for token ids of shape (batch, time)."""
        t = idx.shape[1]
        x = _dropout(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)), self.cfg.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output head

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        # at least fp32 (bf16 logits under autocast are too coarse for the softmax), float64 kept as it is
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout only when it is on: with p = 0 nothing is computed and no random number is drawn."""
    return F.dropout(x, p, training) if p and training else x


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """Which parameters get weight decay: matrices and embeddings yes, LayerNorm gains/biases no."""
    return {name: p.dim() >= 2 for name, p in model.named_parameters()}


def build_model(cfg: ModelConfig, seed: int) -> NanoTransformer:
    """A freshly initialised model; the init depends only on ``seed`` (not on global RNG state)."""
    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = NanoTransformer(cfg)
    torch.random.set_rng_state(devnull_state)
    return model
