"""SASRec's self-attention blocks, as the field trains them (`student.pooling: sasrec`).

Kang & McAuley (ICDM 2018), in the form of the public SASRec-CE runs on Amazon Beauty (test NDCG@10 0.0597,
docs/peers.md): item vectors scaled by sqrt(d) plus a learned position, dropout; per block a layer-normed
query attends causally over the un-normed sequence (residual), then the sequence is layer-normed and a
d -> d -> d ReLU feed-forward adds to it (residual on the normed input, as the original code does); a last
layer norm (the user tower's `norm`). Linear and position weights start Xavier-normal, biases at zero.

Written here rather than taken from a library: the user tower takes item vectors (ids, text projections or
both) rather than ids, and serving needs no recommender framework. The one deliberate difference from the
original: padded positions are masked as keys (the original zeroes them but lets queries attend to them).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-8  # SASRec's


class SASRecBlock(nn.Module):
    """One block: normed-query causal attention over the sequence, then norm and a point-wise feed-forward."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, L, d) sequence, (B, 1, L, L) bool mask (True = query may attend to key) -> (B, L, d); or
        (B, 1, L, L + 1) float additive mask whose first column is the padding key (`SASRecEncoder.attend_padding`)."""
        B, L, d = x.shape
        H = self.num_heads
        q = self.query(self.attn_norm(x)).view(B, L, H, d // H).transpose(1, 2)  # (B, H, L, d/H)
        k, v = self.key_value(x).view(B, L, 2 * H, d // H).transpose(1, 2).chunk(2, dim=1)
        if allowed.shape[-1] == L + 1:  # a zero input's key and value (the projection's biases) lead
            pad_k, pad_v = self.key_value.bias.view(2 * H, 1, d // H).chunk(2)
            k = torch.cat([pad_k.expand(B, H, 1, d // H), k], 2)
            v = torch.cat([pad_v.expand(B, H, 1, d // H), v], 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(o.transpose(1, 2).reshape(B, L, d))
        x = self.ffn_norm(x)
        return x + self.ffn(x)


class SASRecEncoder(nn.Module):
    """(B, L, d) left-padded history vectors -> (B, L, d) causal states (before the last layer norm)."""

    def __init__(self, dim: int, max_len: int, num_layers: int, num_heads: int, dropout: float,
                 attend_padding: bool = False) -> None:
        super().__init__()
        self.scale, self.max_len, self.attend_padding = math.sqrt(dim), max_len, attend_padding
        self.position = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_layers))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_normal_(module.weight)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, seq: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`real` (B, L) bool marks real items; a query sees real keys at or before it (a pad sees itself)."""
        L = seq.shape[1]
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        allowed = (causal & real[:, None, :]) | eye  # (B, L, L)
        if self.attend_padding:  # SASRec pads every history to max_len and lets queries attend to the pads: zero
            # inputs, so every pad's key and value are the projection's biases, i.e. one key whose logit counts
            # max_len - (real items) times; one column, whatever padding this batch happens to carry
            pads = (self.max_len - real.sum(1)).to(seq.dtype)  # (B,)
            allowed = torch.cat([pads.log()[:, None, None].expand(-1, L, 1),
                                 torch.zeros_like(allowed, dtype=seq.dtype).masked_fill(~allowed, float("-inf"))], 2)
        x = self.dropout(seq * self.scale + self.position.weight[-L:])  # left-padded: the last slot is the newest
        x = x * real.unsqueeze(-1)
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return x
