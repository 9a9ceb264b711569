"""A Llama-2/3 decoder from first principles.

RMSNorm -> attention with RoPE and grouped-query heads -> residual, RMSNorm -> SwiGLU -> residual,
repeated n_layers times, then a final RMSNorm and the LM head. Parameter names follow Hugging
Face's `LlamaForCausalLM` (minus its `model.` prefix) so weights move between the two by name;
reading and writing model files is checkpoint.py's job. The math behind each piece is in docs/.

    python model.py configs/shakespeare_char.toml   # build the model, run a training step, report
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.utils.checkpoint

from config import ConfigError, ModelConfig, parse_cli, script


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean square is taken in fp32: in bf16 it loses the precision the division needs.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with Llama 3.1 scaling when configured."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    if cfg.rope_scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        keep_below = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
        scale_above = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
        # Between the two wavelengths, blend linearly (in 1/wavelen) from scaled to unscaled.
        smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv_freq / cfg.rope_scaling_factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < keep_below, inv_freq,
                               torch.where(wavelen > scale_above, inv_freq / cfg.rope_scaling_factor, blended))
    return inv_freq


def rope_cos_sin(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim), in the rotate-half layout."""
    positions = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(cfg))
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + head_dim/2) pair of x: (B, heads, T, head_dim) by its position's angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# SDPA's is_causal misbehaved on PyTorch's MPS backend: in fp16/bf16 it masked only every fourth
# query row (pytorch#195910, silent). On these device types the causal mask is always passed
# explicitly (autocast may run fp32 weights' attention in half precision); it gives the same
# numbers as the usual path. (The cache is written by indexed assignment, not index_copy_, which
# was missing on MPS for a while and then ~100x slower than the CPU until pytorch#185750.)
MPS_SAFE_DEVICES = {"mps"}


class KVCache(nn.Module):
    """Pre-allocated keys and values for n_kv_heads heads (not n_heads: that is GQA's saving)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int | torch.Tensor = 0,
               keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, heads, T, head_dim) at positions start_pos.. and return the keys and values
        the queries attend over.

        An int start_pos: every row continues at the same position, written into cache rows
        rows..rows + B (the engine prefills one slot at a time); the keys and values so far come back.
        A (B,) tensor start_pos: row b continues at its own position start_pos[b] (every slot of the
        decoding engine is at its own length), and the first `keys` positions come back (default:
        all, so that every step has the same shapes, for torch.compile); the caller's mask hides
        what a row has not written. With a (B,) tensor of `rows`, the batch is those cache rows
        (eager decoding feeds only the slots that decode), else all of them.
        """
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos[:, None] + torch.arange(k.shape[2], device=k.device)  # (B, T)
            index = rows if isinstance(rows, torch.Tensor) else torch.arange(k.shape[0], device=k.device)
            # An indexed assignment (index_put_): one write per (row, position), on every device type.
            self.k[index[:, None], :, positions] = k.transpose(1, 2)
            self.v[index[:, None], :, positions] = v.transpose(1, 2)
            if isinstance(rows, torch.Tensor):
                return self.k[rows, :, :keys], self.v[rows, :, :keys]
            return self.k[:, :, :keys], self.v[:, :, :keys]
        batch, end = slice(rows, rows + k.shape[0]), start_pos + k.shape[2]
        self.k[batch, :, start_pos:end] = k
        self.v[batch, :, start_pos:end] = v
        return self.k[batch, :, :end], self.v[batch, :, :end]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, spelled out; k and v may have fewer heads than q."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) booleans, True where query i (the last q_len of k_len positions) may look."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]


# PyTorch tries cuDNN's attention first on recent GPUs (Hopper and newer, with a recent cuDNN), and cuDNN
# builds an execution plan for every new sequence length. Eager decoding meets a new key length at
# every token and a prefill one per prompt length; flash attention needs no plan. Inference at
# varying lengths therefore tries flash first, cuDNN still before the math fallback. (Compiled
# decoding keeps one length, the whole cache, and training fixed ones: both keep PyTorch's order.)
VARYING_LENGTH_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH]


def attention_order(device: torch.device, fixed_shapes: bool) -> contextlib.AbstractContextManager:
    """The SDPA kernel order for a forward: flash first for GPU inference at varying lengths,
    PyTorch's own otherwise (training; compiled decoding's fixed shapes; CPUs)."""
    if device.type == "cuda" and not fixed_shapes and not torch.is_grad_enabled():
        return sdpa_kernel(VARYING_LENGTH_ORDER, set_priority=True)
    return contextlib.nullcontext()


class Attention(nn.Module):
    FUSED, PARTS = "qkv_proj", ("q_proj", "k_proj", "v_proj")  # see decoding.fuse_projections

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.kernel = cfg.attention
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Module | None = None
        self.part_sizes = [cfg.n_heads * cfg.head_dim] + 2 * [cfg.n_kv_heads * cfg.head_dim]
        self.cache: KVCache | None = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split(self.part_sizes, dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                mask: torch.Tensor | None = None, cache_rows: int | torch.Tensor = 0,
                keys: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v, cache_rows, keys)
        is_causal = False  # a mask from the caller (padded rows, fixed-size cache) says it all
        if mask is None:
            # A query block that starts at position 0 is plain causal; after a cached prefix the mask
            # must be offset, and a single new token may see everything.
            full_causal = k.shape[2] == T
            is_causal = full_causal and T > 1 and x.device.type not in MPS_SAFE_DEVICES
            mask = causal_mask(T, k.shape[2], x.device) if T > 1 and not is_causal else None
        if self.kernel == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            if is_causal:
                mask = causal_mask(T, T, x.device)
            y = reference_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    FUSED, PARTS = "gate_up_proj", ("gate_proj", "up_proj")  # see decoding.fuse_projections

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None
        self.part_sizes = [cfg.ffn_dim, cfg.ffn_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).split(self.part_sizes, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                mask: torch.Tensor | None = None, cache_rows: int | torch.Tensor = 0,
                keys: int | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask, cache_rows, keys)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # train.py turns it on (train.activation_checkpointing)
        self.kept_cache: list[KVCache] | None = None  # see setup_cache
        self.reset_parameters()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        source: str = "the state dict") -> "Llama":
        """A model holding `state`'s tensors (lm_head.weight may be absent when tied), built
        without first initializing weights that would be overwritten. `state` is read one tensor
        at a time, so a lazy mapping streams from disk. Missing, extra or misshapen tensors are
        refused in one line naming `source`."""
        with torch.device("meta"):
            model = cls(cfg)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        expected = set(shapes) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
        if missing := sorted(expected - set(state)):
            raise ConfigError(f"{source} has no weights for {missing[0]} (and {len(missing) - 1} more): "
                              f"is it a complete Llama checkpoint?")
        if unexpected := sorted(set(state) - expected - {"lm_head.weight"}):
            raise ConfigError(f"{source} has weights this architecture lacks, e.g. {unexpected[0]}: "
                              f"it is not a plain Llama model")
        weights = {}
        for name in sorted(expected):  # one source tensor alive at a time, besides the model's own
            tensor = state[name]
            if tensor.shape != shapes[name]:
                raise ConfigError(f"{source}: {name} has shape {tuple(tensor.shape)} but the config implies "
                                  f"{tuple(shapes[name])}: the config and the weights disagree")
            weights[name] = tensor.to(dtype)
        model.load_state_dict(weights, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rope_cos, model.rope_sin = rope_cos_sin(cfg)  # buffers built on the meta device
        return model

    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; the projections that write into the residual stream
        are shrunk by 1/sqrt(2 * n_layers) so its variance does not grow with depth."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            elif p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)
            else:
                nn.init.ones_(p)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                start_pos: int | torch.Tensor = 0, last_only: bool = False,
                cache_rows: int | torch.Tensor = 0, keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with targets (-100 = ignore), the mean cross-entropy.

        With a KV cache set up, `tokens` continue the sequence at `start_pos`: an int for every
        row (written into cache rows cache_rows.., so the engine can fill one slot), or a (B,)
        tensor, each row at its own position, attending over the cache's first `keys` positions
        (default: all of them, every step the same shape, for torch.compile); then `cache_rows`
        may be a (B,) tensor naming the cache rows the batch's rows are (default: all, in order).
        `last_only` sends only the final position through the LM head, which is all that
        decoding needs.
        """
        T = tokens.shape[1]
        per_row = isinstance(start_pos, torch.Tensor)
        if not per_row and start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if per_row:
            cos, sin, mask = self.per_row_rope_and_mask(start_pos, T, keys)
        else:
            cos, sin, mask = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T], None
        x = self.embed_tokens(tokens)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        with attention_order(tokens.device, per_row):
            for layer in self.layers:
                if recompute:  # the backward pass runs the block again instead of keeping its activations
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, start_pos, mask, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, start_pos, mask, cache_rows, keys)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def per_row_rope_and_mask(self, start_pos: torch.Tensor, T: int,
                              keys: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE tables (B, 1, T, head_dim) and attention mask (B, 1, T, keys) for T tokens per row,
        row b's at positions start_pos[b]..: a query sees the cache up to its own position.

        Positions past the RoPE table (a speculative round's proposals beyond the context, whose
        outputs are never read) take the table's last row rather than fail.
        """
        positions = start_pos[:, None] + torch.arange(T, device=start_pos.device)  # (B, T)
        key_positions = torch.arange(keys or self.layers[0].self_attn.cache.k.shape[2], device=start_pos.device)
        visible = key_positions <= positions[:, :, None]
        table = positions.clamp(max=self.rope_cos.shape[0] - 1)
        return self.rope_cos[table].unsqueeze(1), self.rope_sin[table].unsqueeze(1), visible.unsqueeze(1)

    # --- KV cache ------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None, max_seq_len: int | None = None) -> None:
        """Give every attention layer an empty KV cache for up to max_seq_len positions (default:
        the model's; a shorter one saves memory, and compiled decoding attends over all of it).

        A cache kept by clear_cache(keep=True) is zeroed and reused when its shape, dtype, device and
        inference mode match: compiled decoding on a GPU replays a CUDA graph that holds the cache's
        addresses, and new buffers would make it record the graph again on every call."""
        device, dtype = self.embed_tokens.weight.device, dtype or self.embed_tokens.weight.dtype
        shape = (batch_size, self.cfg.n_kv_heads, max_seq_len or self.cfg.max_seq_len, self.cfg.head_dim)
        caches = self.kept_cache
        # Inference tensors (what a cache set up in inference mode holds) are written in it alone.
        wanted = (shape, dtype, device, torch.is_inference_mode_enabled())
        if caches is not None and (caches[0].k.shape, caches[0].k.dtype, caches[0].k.device,
                                   caches[0].k.is_inference()) == wanted:
            for cache in caches:
                cache.k.zero_()
                cache.v.zero_()
        else:
            caches = [KVCache(*shape, dtype, device) for _ in self.layers]
        self.kept_cache = None
        for layer, cache in zip(self.layers, caches):
            layer.self_attn.cache = cache

    def clear_cache(self, keep: bool = False) -> None:
        """Take the KV cache out of the attention layers, so a plain forward uses none. With keep,
        the model holds on to its buffers for the next setup_cache of the same shape."""
        if keep and self.layers[0].self_attn.cache is not None:
            self.kept_cache = [layer.self_attn.cache for layer in self.layers]
        elif not keep:
            self.kept_cache = None
        for layer in self.layers:
            layer.self_attn.cache = None

    def standard_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict() with every fused projection split back into its parts: the checkpoint layout."""
        state = self.state_dict()
        if any(not tensor.is_floating_point() for tensor in state.values()):  # only int8 weights (decoding.quantize_int8) are integers
            raise ValueError("an int8 model has no standard checkpoint layout: save the model before quantizing it")
        for prefix, module in self.named_modules():
            if isinstance(module, (Attention, FeedForward)) and getattr(module, module.FUSED) is not None:
                fused = state.pop(f"{prefix}.{module.FUSED}.weight")
                state.update({f"{prefix}.{name}.weight": w for name, w in zip(module.PARTS, fused.split(module.part_sizes))})
        return state

    # --- accounting ----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters; `non_embedding` leaves out the token embedding table (the LM head
        stays when it is a separate matrix, since it is a real matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.cfg.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token: 6 per matmul weight, plus attention
        scores and the weighted sum, 6 * 2 * n_layers * n_heads * head_dim * seq_len (PaLM appendix B,
        where n_heads * head_dim is the model width)."""
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * seq_len


@script
def main(argv: list[str]) -> None:
    """Build the configured model and time one forward/backward on random tokens."""
    cfg = parse_cli(argv, prog="model.py", sections=("model", "train"))
    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model)
    B, T = cfg.train.micro_batch_size, cfg.train.block_size
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1))
    start = time.perf_counter()
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - start
    report = {
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(T),
        "kv_cache_bytes_per_token_fp32": 2 * cfg.model.n_layers * cfg.model.n_kv_heads * cfg.model.head_dim * 4,
        "initial_loss": round(loss.item(), 4),
        "uniform_loss": round(math.log(cfg.model.vocab_size), 4),
        "train_step_tokens_per_s": round(B * T / seconds),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
