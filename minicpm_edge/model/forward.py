"""A compact torch forward of MiniCPM (llama-format MiniCPM, MiniCPM3's latent attention), runnable one piece at a time.

embed -> decoder layer 0..L-1 -> final norm + head. Parameter names match the HF checkpoints, so a layer's state dict
loads directly. The muP factors (FORMATS.md section 0) come from ModelConfig and are 1 for llama-format checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import rope
from .checkpoint import Checkpoint
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if torch.is_grad_enabled() or torch.result_type(self.weight, y) != y.dtype:
            return self.weight * y
        return y.mul_(self.weight)  # inference: weight * y in y's own memory (one activation-sized tensor fewer)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype=torch.float32,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, rope_dim] (the rotated part of a head) for HF's rotate-half convention, with the checkpoint's rope scaling.

    `seq_len` (default: the last position + 1, the key/value length at that point) picks the frequencies where they
    depend on the length (LongRoPE's list, dynamic NTK past max_position_embeddings)."""
    if seq_len is None:
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv = rope.inverse_frequencies(cfg, seq_len)
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    a = rope.attention_factor(cfg)
    return (emb.cos() * a).to(dtype), (emb.sin() * a).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1] for x's halves x1, x2: the same float operations
    (a - b for a + (-b)), in x cos's own halves, with two half-sized temporaries instead of four x-sized ones."""
    d = x.shape[-1] // 2
    out = x * cos
    out[..., :d] -= x[..., d:] * sin[..., :d]
    out[..., d:] += x[..., :d] * sin[..., d:]
    return out


QUERY_BLOCK = 256  # queries per attention call on long prompts


def causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over the keys k, v [B, Hkv, S, *] (S >= T: the last T positions are the
    queries'; H a multiple of Hkv, each key/value head shared by H / Hkv query heads, without copying it).
    Long prompts go in blocks of QUERY_BLOCK queries, each over the keys up to its last query only: the masked-out
    part of the score matrix is skipped rather than computed (a quarter to a third less work at T = 512; torch's CPU
    flash kernel does not skip it)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    outs = []
    for a in range(0, T, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, T)
        qb, kb, vb = q[:, :, a:b], k[:, :, :S - T + b], v[:, :, :S - T + b]
        if S - T + a == 0:  # query t sees keys 0..t: the plain causal mask, which the kernel makes itself
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa))
            continue
        # query t (absolute S - T + t) sees keys 0..S - T + t
        mask = torch.ones(b - a, S - T + b, dtype=torch.bool, device=q.device).tril(S - T + a)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def forward(self, x, cos, sin, past=None):
        mixed, present = self.mix(x, cos, sin, past)
        return self.o_proj(mixed), present

    def mix(self, x, cos, sin, past=None):
        """Attention up to (not including) o_proj: the input that o_proj sees."""
        c = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        out = causal_attention(q, k, v, 1.0 / math.sqrt(c.head_dim))
        return out.transpose(1, 2).reshape(B, T, -1), present


class LatentAttention(nn.Module):
    """MiniCPM3's multi-head latent attention, as transformers' MiniCPM3Attention computes it.

    q = q_b(norm(q_a(x))), per head [nope | rope]; kv_a(x) = [latent | k_rope], the latent normed and expanded by kv_b
    into per-head [k_nope | v]; rotary on the rope parts only (k_rope shared by every head). The cache holds the normed
    latent and the rotated k_rope: (kv_lora_rank + qk_rope_head_dim) numbers per position and layer.
    The latent norms use RMSNorm's default eps 1e-6, not rms_norm_eps (transformers' and OpenBMB's code alike)."""

    LATENT_EPS = 1e-6

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, self.LATENT_EPS)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * cfg.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, self.LATENT_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * cfg.v_head_dim, h, bias=False)

    def forward(self, x, cos, sin, past=None):
        mixed, present = self.mix(x, cos, sin, past)
        return self.o_proj(mixed), present

    def q_latent(self, x):
        """The input that q_b_proj sees."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def kv_latent(self, x):
        """(normed latent: the input that kv_b_proj sees, k_rope before rotary)."""
        c = self.cfg
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope

    def mix(self, x, cos, sin, past=None):
        """Attention up to (not including) o_proj: the input that o_proj sees."""
        c = self.cfg
        B, T, _ = x.shape
        n, nope = c.num_attention_heads, c.qk_nope_head_dim
        q = self.q_b_proj(self.q_latent(x)).view(B, T, n, c.head_dim).transpose(1, 2)
        latent, k_rope = self.kv_latent(x)
        q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # [B, 1, T, rope]: one rotary key for all heads
        if past is not None:
            latent, k_rope = torch.cat([past[0], latent], dim=1), torch.cat([past[1], k_rope], dim=2)
        present = (latent, k_rope)
        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, n, nope + c.v_head_dim).transpose(1, 2)
        k = torch.cat([kv[..., :nope], k_rope.expand(B, n, S, c.qk_rope_head_dim)], dim=-1)
        v = kv[..., nope:]
        out = causal_attention(q, k, v, 1.0 / math.sqrt(c.head_dim))
        return out.transpose(1, 2).reshape(B, T, -1), present


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act, self.threshold = cfg.hidden_act, cfg.hidden_act_param
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def activation(self, g: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.act == "silu":
            return F.silu(g, inplace=inplace)
        if self.act == "relu":
            return F.relu(g, inplace=inplace)
        if inplace:  # FATReLU
            return g.masked_fill_(~(g > self.threshold), 0)
        return torch.where(g > self.threshold, g, torch.zeros_like(g))

    def hidden(self, x):
        """act(gate(x)) * up(x): the input that down_proj sees. Without autograd, made in gate's output (no
        further intermediate-sized tensors: each is a fresh allocation as large as the layer's biggest activations)."""
        if torch.is_grad_enabled():
            return self.activation(self.gate_proj(x)) * self.up_proj(x)
        return self.activation(self.gate_proj(x), inplace=True).mul_(self.up_proj(x))

    def forward(self, x):
        return self.down_proj(self.hidden(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.residual_scale = cfg.residual_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LatentAttention(cfg) if cfg.mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, past=None):
        a, present = self.self_attn(self.input_layernorm(h), cos, sin, past)
        h = h + a * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h, present


class MiniCPM(nn.Module):
    """The whole model; for streaming use `embed`, `layers[i]` and `head` separately."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.cfg.embedding_scale

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h) / self.cfg.logit_scale
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def forward(self, ids: torch.Tensor, past: list | None = None, start: int = 0):
        """Logits for ids [B, T] at positions start..start+T-1; returns (logits, present key/values)."""
        cos, sin = rope_tables(self.cfg, torch.arange(start, start + ids.shape[1]))
        h = self.embed(ids)
        presents = []
        for i, layer in enumerate(self.layers):
            h, p = layer(h, cos, sin, None if past is None else past[i])
            presents.append(p)
        return self.head(h), presents

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy decoding with the key/value cache."""
        logits, past = self(torch.tensor([ids]))
        out = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_id:
                break
            logits, past = self(torch.tensor([[nxt]]), past, start=len(ids) + len(out) - 1)
        return out


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> MiniCPM:
    """The whole model in memory (small models, tests, reference runs)."""
    with torch.device("meta"):  # no random initialisation of weights the checkpoint's tensors replace
        model = MiniCPM(ckpt.config)
    state = {n.removeprefix("model."): ckpt.tensor(n, dtype) for n in ckpt.names if not n.startswith("model.layers.")}
    for i in range(ckpt.config.num_hidden_layers):
        state.update({f"layers.{i}.{k}": v for k, v in ckpt.layer_state(i, dtype).items()})
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    _load_state(model, state, ckpt, "model.")
    return model.to(dtype).eval()


def load_layer(ckpt: Checkpoint, i: int, dtype: torch.dtype = torch.float32) -> DecoderLayer:
    """Decoder layer i alone, for streaming through a model that does not fit in memory."""
    with torch.device("meta"):
        layer = DecoderLayer(ckpt.config)
    state = {k: v for k, v in ckpt.layer_state(i, dtype).items() if not k.endswith("rotary_emb.inv_freq")}
    _load_state(layer, state, ckpt, f"model.layers.{i}.")
    return layer.to(dtype).eval()


def _load_state(module: nn.Module, state: dict, ckpt: Checkpoint, prefix: str) -> None:
    """load_state_dict, with a tensor the model has no place for (or lacks) named in a UserError."""
    from ..errors import UserError

    expected = module.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{ckpt.dir}: unexpected tensor {prefix}{unexpected[0]} (not part of a MiniCPM model)"
                        + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    bad = next((k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)), None)
    if bad is not None:
        raise UserError(f"{ckpt.dir}: {prefix}{bad} has shape {list(state[bad].shape)}, the model expects "
                        f"{list(expected[bad].shape)}")
    # built on the meta device (no random initialisation), it takes the checkpoint's tensors themselves, which
    # Checkpoint.tensor makes for each caller; what is missing Checkpoint has already refused
    module.load_state_dict(state, strict=True, assign=True)
