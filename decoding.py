"""The decoding-speed layers and transforms: fused projections, the transposed layout of widening
weights, one-row matmuls, int8 weights. How a loaded model is made fast to decode without changing
what it computes (int8: up to its quantization error); model.py holds the model itself.

prepare_for_decoding applies, at load time, the transforms that pay off on the model's device and
way of decoding (eager or compiled). The reasons and measurements are in docs/decoding.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Attention, FeedForward, Llama

# ---------------------------------------------------------------------------------------------
# Layers


def linear_from(weight: torch.Tensor, requires_grad: bool, cls: type[nn.Linear] = nn.Linear) -> nn.Linear:
    """A bias-free nn.Linear (or subclass) holding `weight` (out, in) itself, without initializing another first."""
    with torch.device("meta"):
        linear = cls(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return linear


def one_row_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for an x holding one row, as a multiply-and-sum in fp32. Compiled, it is one
    vectorized pass over the weight (an int8 weight converted inside it), which on CPU streams
    memory 1.5-3x faster than the BLAS matrix-vector product; eager, it would build the whole
    product first, so it is for compiled decoding only."""
    return (weight * x.unsqueeze(-2).float()).sum(-1).to(x.dtype)


class RowwiseLinear(nn.Linear):
    """nn.Linear that computes a single input row with one_row_matmul (use_rowwise_matmuls)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_row_matmul(x, self.weight) if x.shape[:-1].numel() == 1 else super().forward(x)


def pack_int8_columns(q: torch.Tensor) -> torch.Tensor:
    """An (out, in) int8 matrix as (out, ceil(in / 4)) int32 words: byte b of word j in a row holds
    column b * words + j (zero-padded). The one-row matmul then reads whole 32-bit words, which every
    x86 ISA loads in one instruction; AVX2 cannot load fewer than 32 bytes under a mask, and Inductor's
    pass over plain int8 rows copied each 8 of them through a buffer (7x slower than fp32 there)."""
    words = -(-q.shape[1] // 4)
    quarters = F.pad(q, (0, 4 * words - q.shape[1])).view(q.shape[0], 4, words).to(torch.int32)
    return (quarters[:, 0] & 255) | ((quarters[:, 1] & 255) << 8) | ((quarters[:, 2] & 255) << 16) | (quarters[:, 3] << 24)


def int8_quarter(packed: torch.Tensor, b: int) -> torch.Tensor:
    """Byte b of every word, sign-extended: shifted to the top of the word and back."""
    return (packed << (24 - 8 * b)) >> 24


def unpack_int8_columns(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """pack_int8_columns undone: the (out, in) int8 matrix."""
    return torch.cat([int8_quarter(packed, b) for b in range(4)], dim=1)[:, :in_features].to(torch.int8)


def packed_one_row_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ q.T for one row x and q = unpack_int8_columns(packed), in fp32: the four bytes of a word
    meet the four quarters of x, and their products are summed before the row's reduction (one
    accumulator per row, not four: 1.6-1.8x fp32 per decoding step instead of 1.3-1.4x). For
    compiled decoding only (eager, it would build four products the size of the weight)."""
    quarters = F.pad(x.reshape(-1).float(), (0, 4 * packed.shape[1] - x.shape[-1])).view(4, -1)
    total = sum(int8_quarter(packed, b) * quarters[b] for b in range(4)).sum(-1)
    return total.view(*x.shape[:-1], -1).to(x.dtype)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and one scale per output row (weight-only
    quantization: activations stay floating point). Each row is scaled so that its largest
    magnitude becomes 127. Compiled, the int8-to-float conversion fuses into the matmul (a single
    row goes through a one-row multiply-and-sum), so a decoding step reads one byte per weight. On
    CPU the bytes are kept four to a 32-bit word (pack_int8_columns); int8_weight() reads either
    layout back as the (out, in) matrix."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = (w / scales[:, None]).round().to(torch.int8)
        self.in_features = weight.shape[1]
        self.register_buffer("weight", pack_int8_columns(q) if weight.device.type == "cpu" else q)
        self.register_buffer("scales", scales.to(weight.dtype))

    def int8_weight(self) -> torch.Tensor:
        if self.weight.dtype == torch.int8:
            return self.weight
        return unpack_int8_columns(self.weight, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() > 1:
            return F.linear(x, self.int8_weight().to(x.dtype)) * self.scales
        if self.weight.dtype == torch.int32:
            return packed_one_row_matmul(x, self.weight) * self.scales
        return one_row_matmul(x, self.weight) * self.scales


# ---------------------------------------------------------------------------------------------
# Transforms of a loaded model: each keeps its parameter names and what it computes


def prepare_for_decoding(model: Llama, quantize: str = "none", compiled: bool = False) -> None:
    """The load-time transformations that make decoding faster: fused projections; on CPU, for
    eager decoding the transposed layout of widening weights (faster under BLAS) and for compiled
    decoding one-row matmuls as multiply-and-sum passes (faster than BLAS once compiled); then
    optionally int8 weights. Outputs are unchanged up to float rounding (int8: up to its
    quantization error)."""
    fuse_projections(model)
    if model.embed_tokens.weight.device.type == "cpu" and compiled:
        use_rowwise_matmuls(model)
    elif model.embed_tokens.weight.device.type == "cpu":
        use_decoding_layout(model)
    if quantize == "int8":
        quantize_int8(model)


def use_decoding_layout(model: Llama) -> None:
    """Store every widening projection (gate, up, the LM head) transposed in memory: the same
    (out, in) parameter and values, viewed from an (in, out) row-major buffer.

    At batch 1 a projection is a vector-matrix product bound by reading the weight. Over the
    standard layout the CPU BLAS takes a dot product per output, each over a short row of `in`
    floats; over the transposed one it streams long rows of `out` floats and reads memory
    faster (bench/generate_speed.py runs both layouts). Narrowing projections are
    already faster as they are. Meant for inference; the math and the parameter names do
    not change, and checkpoint.save_hf writes the standard layout.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features > module.in_features:
            module.weight = nn.Parameter(module.weight.detach().t().contiguous().t(),
                                         requires_grad=module.weight.requires_grad)
    if model.cfg.tie_embeddings:
        model.embed_tokens.weight = model.lm_head.weight


def fuse_projections(model: Llama) -> None:
    """Compute q, k, v with one matmul and gate, up with another, from their weights
    concatenated along the output dimension: a decoding step then runs 4 matmuls per layer
    instead of 7, each over one longer weight. The function is unchanged;
    unfuse_projections() restores the separate layers and model.standard_state_dict() (what
    save_hf writes) always holds them separately."""
    for module in model.modules():
        if isinstance(module, (Attention, FeedForward)) and getattr(module, module.FUSED) is None:
            parts = [getattr(module, name) for name in module.PARTS]
            fused = torch.cat([p.weight.detach() for p in parts])
            setattr(module, module.FUSED, linear_from(fused, parts[0].weight.requires_grad))
            for name in module.PARTS:
                setattr(module, name, None)


def unfuse_projections(model: Llama) -> None:
    """fuse_projections undone: the separate q, k, v and gate, up layers again."""
    for module in model.modules():
        if isinstance(module, (Attention, FeedForward)) and (fused := getattr(module, module.FUSED)) is not None:
            if not isinstance(fused, nn.Linear):
                raise ValueError("a quantized model cannot be unfused: reload it")
            for name, weight in zip(module.PARTS, fused.weight.detach().split(module.part_sizes)):
                setattr(module, name, linear_from(weight, fused.weight.requires_grad))
            setattr(module, module.FUSED, None)


def use_rowwise_matmuls(model: Llama) -> None:
    """Make every nn.Linear a RowwiseLinear (same parameter): for compiled decoding on CPU."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, linear_from(child.weight, child.weight.requires_grad, RowwiseLinear))
    if model.cfg.tie_embeddings:  # one parameter object again, as before
        model.embed_tokens.weight = model.lm_head.weight


def quantize_int8(model: Llama) -> None:
    """Replace every linear layer (the LM head too, the embedding not) with Int8Linear: a
    quarter of fp32's weight bytes, half of bf16's. Meant for inference; there is no way back."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight))
