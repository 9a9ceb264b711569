"""Draw every figure of docs/ from the project's own code (and its own runs, when there are any).

    python docs/make_figures.py          # writes docs/figures/*.png in well under two minutes on CPU

The helpers above the figures (online-softmax attention, KV-cache bytes, forward FLOPs) are the
readable versions the pages explain; tests/test_docs.py checks each of them against model.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checkpoint import read_llama2c  # noqa: E402
from config import ModelConfig, TrainConfig  # noqa: E402
from decoding import Int8Linear  # noqa: E402
from engine import min_p_filter, top_k_filter, top_p_filter  # noqa: E402
from model import FeedForward, Llama, RMSNorm, apply_rope, causal_mask, reference_attention, rope_cos_sin, rope_frequencies  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train import lr_at  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
DPI = 100

# The shape of Llama 3 8B: what the KV-cache arithmetic is quoted for.
LLAMA3_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                 max_seq_len=8192, rope_theta=500000.0)
# The reference config of bench/: what the decoding-cost curves are drawn for.
BENCH_CONFIG = dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024, max_seq_len=1024)
# configs/llama_1b_fsdp.toml, whose memory the parallel page works through.
RECIPE_1B = ROOT / "configs" / "llama_1b_fsdp.toml"
# The AdamW schedule the LR page works through (the CPU preset's before it moved to Muon).
CPU_SCHEDULE = dict(lr=3e-3, min_lr=3e-4, warmup_steps=100, max_steps=1800, decay_fraction=0.2)


# ---------------------------------------------------------------------------------------------
# The computations the pages explain


def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                             trace: list | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (Tq, d), k and v (Tk, d), reading keys `block` at a time.

    FlashAttention's recurrence without the kernel: a running row max m, a running denominator l
    and an unnormalized output acc. When a block raises the max, what was summed so far is scaled by
    exp(m_old - m_new), so no score is ever exponentiated against a max smaller than itself. The
    full (Tq, Tk) score matrix never exists. `trace` collects (m, l, acc / l) after each block.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = torch.full((q.shape[0], 1), float("-inf"))
    l = torch.zeros(q.shape[0], 1)
    acc = torch.zeros(q.shape[0], v.shape[-1])
    for start in range(0, k.shape[0], block):
        scores = (q @ k[start:start + block].T) * scale
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        correction = torch.exp(m - m_new)  # exp(-inf) = 0 on the first block: nothing to rescale
        p = torch.exp(scores - m_new)
        l = l * correction + p.sum(dim=-1, keepdim=True)
        acc = acc * correction + p @ v[start:start + block]
        m = m_new
        if trace is not None:
            trace.append((m.clone(), l.clone(), acc / l))
    return acc / l


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch: int,
                   bytes_per_value: int) -> int:
    """Keys and values (the 2), for every layer, KV head, channel, position and sequence."""
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_value


def forward_flops(cfg: ModelConfig, new_tokens: int, context: int) -> int:
    """FLOPs of one forward over `new_tokens` positions that attend to `context` keys each.

    Every matmul weight costs 2 FLOPs per position (a multiply and an add); attention costs
    2 * dim per query-key pair for the scores and as much again for the weighted sum of values.
    """
    with torch.device("meta"):  # shapes only: nothing is allocated, so 8B-sized configs are free
        model = Llama(cfg)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * matmul_weights * new_tokens + 4 * cfg.n_layers * cfg.dim * new_tokens * context


def decode_step_flops(cfg: ModelConfig, context: int, cached: bool) -> int:
    """FLOPs to produce the token after `context` tokens: one new position with the KV cache,
    every position again without it."""
    return forward_flops(cfg, 1 if cached else context, context)


def training_state_bytes(params: int) -> int:
    """fp32 weights, their gradients and AdamW's two moments: 16 bytes a parameter."""
    return 16 * params


def next_byte_distribution(text: bytes, context: bytes) -> torch.Tensor:
    """Logits (log frequencies, -inf if unseen) of the byte that follows `context` in `text`."""
    counts = torch.zeros(256)
    start = text.find(context)
    while start != -1 and start + len(context) < len(text):
        counts[text[start + len(context)]] += 1
        start = text.find(context, start + 1)
    return counts.log()


def muon_update(grad: torch.Tensor) -> torch.Tensor:
    """The orthogonalized matrix torch.optim.Muon adds to a weight for this gradient, read back
    from one step of it (no momentum, no decay, learning rate 1, its shape scaling divided out)."""
    weight = torch.nn.Parameter(torch.zeros_like(grad))
    weight.grad = grad.clone()
    torch.optim.Muon([weight], lr=1.0, momentum=0.0, weight_decay=0.0).step()
    return -weight.detach() / math.sqrt(max(1.0, grad.shape[0] / grad.shape[1]))


def newton_schulz_polynomial(s: torch.Tensor, steps: int) -> torch.Tensor:
    """What `steps` rounds of the quintic a s + b s^3 + c s^5 make of a singular value s."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def cpu_model_gradient(name: str) -> torch.Tensor:
    """The gradient of one weight of the CPU config's model, freshly initialized, on random tokens."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=66, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64))
    tokens = torch.randint(0, 66, (16, 65))
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    return dict(model.named_parameters())[name].grad


def speculative_outcome(p: torch.Tensor, q: torch.Tensor) -> tuple[float, torch.Tensor]:
    """For one drafted position: (probability that a proposal drawn from q is kept, the distribution
    of the token the position yields: the kept proposal or the replacement from max(p - q, 0))."""
    kept, residual = torch.minimum(p, q), (p - q).clamp(min=0)
    return kept.sum().item(), kept + (1 - kept.sum()) * residual / residual.sum()


def tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens a speculative round yields with acceptance rate alpha and k drafted tokens."""
    return k + 1.0 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def project_text() -> str:
    """The repository's own tracked prose and code: a real, reproducible corpus."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    return "\n".join((ROOT / f).read_text() for f in sorted(files) if not f.startswith("docs/"))


# ---------------------------------------------------------------------------------------------
# Figures


def save(fig: plt.Figure, name: str) -> None:
    fig.tight_layout()
    fig.savefig(FIGURES / name, dpi=DPI)
    plt.close(fig)
    print(f"wrote docs/figures/{name}")


def describe(ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, legend and a light grid: the finish every line plot shares."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")


def fig_rmsnorm() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(2, eps=1e-5)
    x = torch.randn(200, 2) * torch.rand(200, 1) * 3
    with torch.no_grad():
        y = norm(x)
    fig, (ax_map, ax_scale) = plt.subplots(1, 2, figsize=(10, 4.3))
    ax_map.scatter(x[:, 0], x[:, 1], s=8, alpha=0.5, label="x")
    ax_map.scatter(y[:, 0], y[:, 1], s=8, color="tab:red", label="RMSNorm(x)")
    ax_map.add_patch(plt.Circle((0, 0), math.sqrt(2), fill=False, ls="--", color="gray"))
    ax_map.set_aspect("equal")
    ax_map.set_title("dim 2: every vector lands on the circle of radius $\\sqrt{2}$")
    ax_map.legend(loc="upper left")
    x = torch.randn(1, 512)
    x = x / x.pow(2).mean().sqrt()  # rms(x) = 1, so rms(a x) = a
    scales = torch.logspace(-5, 3, 200)
    norm = RMSNorm(512, eps=1e-5)
    with torch.no_grad():
        rms_out = [norm(a * x).pow(2).mean().sqrt().item() for a in scales]
    ax_scale.semilogx(scales, rms_out)
    ax_scale.axvline(math.sqrt(1e-5), color="gray", ls="--", label="rms(a x) = $\\sqrt{\\epsilon}$")
    ax_scale.set_xlabel("scale a of the input (rms(a x) = a)")
    ax_scale.set_ylabel("rms of RMSNorm(a x)")
    ax_scale.set_title("scale invariant until the input's rms nears $\\sqrt{\\epsilon}$")
    ax_scale.legend()
    save(fig, "rmsnorm.png")


def fig_rope() -> None:
    cfg = ModelConfig(dim=128, n_heads=1, max_seq_len=1024)
    cfg.validate()
    cos, sin = rope_cos_sin(cfg)
    half = cfg.head_dim // 2
    fig, (ax_rot, ax_decay, ax_scale) = plt.subplots(1, 3, figsize=(15, 4.5))

    # One vector, rotated to positions 0..23: the fast pair 0 spins, the slow pair 8 creeps.
    v = torch.zeros(1, 1, 1, cfg.head_dim)
    v[..., 0], v[..., half] = 1.0, 0.0
    v[..., 8], v[..., 8 + half] = 0.7, 0.0
    positions = torch.arange(24)
    rotated = apply_rope(v.expand(1, 1, len(positions), -1), cos[positions], sin[positions])[0, 0]
    for i, color in ((0, "tab:blue"), (8, "tab:orange")):
        ax_rot.plot(rotated[:, i], rotated[:, i + half], "o-", ms=3, color=color,
                    label=f"pair {i}: $\\theta_{{{i}}}$ = {rope_frequencies(cfg)[i]:.3f} rad/position")
    ax_rot.set_aspect("equal")
    ax_rot.set_title("one vector at positions 0..23")
    ax_rot.set_xlabel("$x_i$")
    ax_rot.set_ylabel("$x_{i + d/2}$")
    ax_rot.legend(loc="lower left", fontsize=8)

    # |q_0 . k_n| for q = k = all ones: the long-range decay RoFormer describes.
    ones = torch.ones(1, 1, cfg.max_seq_len, cfg.head_dim)
    rotated = apply_rope(ones, cos, sin)[0, 0]
    scores = (rotated[0] @ rotated.T).abs()
    ax_decay.plot(scores, lw=0.8)
    ax_decay.set_xlabel("relative distance n - m")
    ax_decay.set_ylabel("$|q_m \\cdot k_n|$, q = k = ones (head_dim 128)")
    ax_decay.set_title("scores of equal vectors decay with distance")

    # Llama 3.1 scaling: which wavelengths grow, which stay.
    llama3 = ModelConfig(dim=4096, n_heads=32, rope_theta=500000.0)
    scaled = ModelConfig(dim=4096, n_heads=32, rope_theta=500000.0, rope_scaling="llama3")
    llama3.validate(), scaled.validate()
    before, after = 2 * math.pi / rope_frequencies(llama3), 2 * math.pi / rope_frequencies(scaled)
    ax_scale.loglog(before, after / before, "o", ms=3)
    for wavelength, label in ((8192 / 4, "original / high_freq_factor"), (8192 / 1, "original / low_freq_factor")):
        ax_scale.axvline(wavelength, color="gray", ls="--")
        ax_scale.text(wavelength, 1.3, label, rotation=90, fontsize=8, ha="right")
    ax_scale.set_xlabel("wavelength $2\\pi/\\theta_i$ before scaling (positions)")
    ax_scale.set_yticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax_scale.minorticks_off()
    ax_scale.set_ylabel("wavelength after / before")
    ax_scale.set_title("Llama 3.1 scaling (factor 8, original 8192)")
    save(fig, "rope.png")


def fig_masks() -> None:
    T, window = 12, 4
    causal = causal_mask(T, T, torch.device("cpu"))
    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    sliding = causal & (rows - cols < window)
    offset = causal_mask(3, T, torch.device("cpu"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), width_ratios=(1, 1, 1))
    for ax, mask, title in ((axes[0], causal, "causal_mask(12, 12)"),
                            (axes[1], sliding, f"sliding window of {window}"),
                            (axes[2], offset, "causal_mask(3, 12): 3 new queries\nafter 9 cached keys")):
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4)
        ax.set_title(title)
        ax.set_xlabel("key position")
        ax.set_ylabel("query")
        ax.set_xticks(range(T))
        ax.set_yticks(range(mask.shape[0]))
    axes[2].set_yticklabels([str(T - 3 + i) for i in range(3)])
    axes[2].set_aspect(1.0)
    save(fig, "masks.png")


def fig_kv_cache_memory() -> None:
    cfg = ModelConfig(**LLAMA3_8B)
    cfg.validate()
    contexts = torch.arange(0, 131072 + 1, 1024)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n_kv_heads, name in ((32, "MHA (32 KV heads)"), (8, "GQA (8 KV heads, Llama 3 8B)"), (1, "MQA (1 KV head)")):
        gib = [kv_cache_bytes(cfg.n_layers, n_kv_heads, cfg.head_dim, int(t), 1, 2) / 2**30 for t in contexts]
        ax.plot(contexts / 1024, gib, label=name)
    with torch.device("meta"):
        weights_gib = Llama(cfg).num_params() * 2 / 2**30
    ax.axhline(weights_gib, color="gray", ls="--", label=f"the bf16 weights ({weights_gib:.1f} GiB)")
    describe(ax, "context (K tokens), batch 1", "KV cache (GiB, bf16)",
             "KV cache of a Llama-3-8B shape: 32 layers, 32 query heads, head_dim 128")
    save(fig, "kv_cache_memory.png")


def fig_decode_cost() -> None:
    cfg = ModelConfig(**BENCH_CONFIG)
    contexts = list(range(1, cfg.max_seq_len + 1, 8))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for cached, name in ((True, "with the KV cache"), (False, "without: the whole prefix again")):
        ax.semilogy(contexts, [decode_step_flops(cfg, t, cached) for t in contexts], label=name)
    describe(ax, "tokens already in the context", "forward FLOPs for the next token",
             "decoding cost per token (bench/ reference config, 6 layers, dim 384)")
    save(fig, "decode_cost.png")


def fig_lr_schedules() -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    steps = range(CPU_SCHEDULE["max_steps"] + 1)
    for schedule in ("cosine", "wsd", "constant"):
        cfg = TrainConfig(lr_schedule=schedule, **CPU_SCHEDULE)
        ax.plot(steps, [lr_at(s, cfg) for s in steps], label=schedule)
    describe(ax, "step", "learning rate",
             "train.lr_at, lr 3e-3 to 3e-4 over 1800 steps (100 warmup steps)")
    save(fig, "lr_schedules.png")


def fig_precision() -> None:
    x = torch.logspace(-12, 40, 2000, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        error = ((x.to(dtype).double() - x).abs() / x).nan_to_num(posinf=1.0).clamp(max=1.0)
        ax.loglog(x, error.clamp(min=1e-10), label=name, lw=1)
    describe(ax, "|value|", "relative rounding error (1 = lost: zero or inf)",
             "what a cast to each dtype keeps")
    save(fig, "precision.png")


def fig_online_softmax() -> None:
    torch.manual_seed(3)
    d, n_keys, block = 16, 64, 8
    q, k, v = torch.randn(1, d), torch.randn(n_keys, d) * 1.5, torch.randn(n_keys, 2)
    trace: list = []
    online = online_softmax_attention(q, k, v, block, trace)
    full = reference_attention(q[None, None], k[None, None], v[None, None], None)[0, 0]
    scores = (q @ k.T)[0] / math.sqrt(d)
    fig, (ax_scores, ax_out) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_scores.bar(range(n_keys), scores, color=[f"C{(i // block) % 10}" for i in range(n_keys)])
    ax_scores.step([b * block for b in range(len(trace) + 1)], [trace[0][0].item()] + [m.item() for m, _, _ in trace],
                   where="pre", color="black", label="running max m after each block")
    ax_scores.set_xlabel("key (colour = block of 8)")
    ax_scores.set_ylabel("score $q \\cdot k / \\sqrt{d}$")
    ax_scores.legend(loc="lower right")
    ax_scores.set_title("one query, keys read a block at a time")
    path = torch.stack([out[0] for _, _, out in trace])
    ax_out.plot(path[:, 0], path[:, 1], "o-", label="online output after blocks 1, 2, ...")
    for i, (a, b) in enumerate(path):
        ax_out.annotate(str(i + 1), (a, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_out.plot(*full[0], "*", ms=16, color="tab:red", label="full softmax (model.reference_attention)")
    ax_out.set_xlabel("output channel 0")
    ax_out.set_ylabel("output channel 1")
    ax_out.set_title(f"the last block lands on the exact answer (max diff {(online - full).abs().max():.1e})")
    ax_out.legend()
    save(fig, "online_softmax.png")


def fig_swiglu() -> None:
    x = torch.linspace(-5, 3, 400)
    fig, (ax_act, ax_params) = plt.subplots(1, 2, figsize=(11, 4.2))
    for y, name in ((F.relu(x), "ReLU"), (F.gelu(x), "GELU"), (F.silu(x), "SiLU (the gate of SwiGLU)")):
        ax_act.plot(x, y, label=name)
    ax_act.legend()
    ax_act.grid(alpha=0.3)
    ax_act.set_title("activations")
    dim = 4096
    cfg = ModelConfig(dim=dim, n_heads=32, multiple_of=256)
    with torch.device("meta"):
        swiglu = sum(p.numel() for p in FeedForward(cfg).parameters())
        swiglu_4d = sum(p.numel() for p in FeedForward(ModelConfig(dim=dim, n_heads=32, hidden_dim=4 * dim)).parameters())
    gelu = 2 * dim * 4 * dim
    bars = {"GELU MLP\nhidden 4·dim": gelu, f"SwiGLU\nhidden {cfg.ffn_dim}": swiglu, "SwiGLU\nhidden 4·dim": swiglu_4d}
    ax_params.bar(list(bars), [n / 1e6 for n in bars.values()], color=["tab:gray", "tab:green", "tab:red"])
    for i, n in enumerate(bars.values()):
        ax_params.text(i, n / 1e6, f"{n / 1e6:.1f}M", ha="center", va="bottom")
    ax_params.set_ylabel("parameters per layer (millions)")
    ax_params.set_title(f"feed-forward parameters at dim {dim}")
    save(fig, "swiglu.png")


def fig_sampling() -> None:
    logits = next_byte_distribution(project_text().encode(), b" ")
    order = logits.argsort(descending=True)[:12]
    labels = ["␣" if i == ord(" ") else chr(i) for i in order.tolist()]
    base = logits.softmax(-1)
    filters = {"temperature 0.7": (logits / 0.7), "top_k 5": top_k_filter(logits[None], 5)[0],
               "top_p 0.5": top_p_filter(logits[None], 0.5)[0], "min_p 0.1": min_p_filter(logits[None], 0.1)[0]}
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.8), sharey=True)
    axes[0].bar(range(12), base[order], color="tab:gray")
    axes[0].set_title("next byte after a space\n(counts in this repo's code)")
    axes[0].set_ylabel("probability")
    for ax, (name, filtered) in zip(axes[1:], filters.items()):
        probs = filtered.softmax(-1)
        ax.bar(range(12), base[order], color="lightgray", label="before")
        ax.bar(range(12), probs[order], color="tab:blue", label="after")
        ax.set_title(f"{name}\n({int(torch.isfinite(filtered).sum())} tokens left)")
    for ax in axes:
        ax.set_xticks(range(12))
        ax.set_xticklabels(labels)
    axes[1].legend()
    save(fig, "sampling.png")


def fig_bpe() -> None:
    text = project_text()
    train_text, test_text = text[: len(text) * 9 // 10], text[len(text) * 9 // 10:]
    sizes = [259, 300, 400, 600, 1000, 2000, 4000]
    bytes_per_token = []
    for size in sizes:
        tok = Tokenizer.train_bpe([train_text], vocab_size=size)
        bytes_per_token.append(len(test_text.encode()) / len(tok.encode(test_text)))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.semilogx(sizes, bytes_per_token, "o-")
    ax.set_xlabel("vocabulary size (256 bytes + 3 specials + merges)")
    ax.set_ylabel("bytes per token on held-out text")
    ax.set_title("each merge shortens the sequence (trained on this repo's code)")
    ax.grid(alpha=0.3, which="both")
    save(fig, "bpe.png")


def fig_checkpoint_protocol() -> None:
    steps = ["write files into\nckpt-N.tmp/", "write COMPLETE\n(sha256 of each file)", "fsync files\nand folder",
             "rename to\nckpt-N/", "latest := ckpt-N\n(atomic replace)"]
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for i, label in enumerate(steps):
        ax.text(i * 2.4, 0, label, ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="round", fc="tab:green" if i == len(steps) - 1 else "whitesmoke", alpha=0.5))
        if i:
            ax.annotate("", xy=(i * 2.4 - 1.05, 0), xytext=((i - 1) * 2.4 + 1.05, 0), arrowprops=dict(arrowstyle="->"))
    ax.text(4.8, -0.85, "a crash anywhere before the last box: latest still names ckpt-(N-1), which is whole",
            ha="center", fontsize=10, color="tab:red")
    ax.set_xlim(-1.3, 10.9)
    ax.set_ylim(-1.2, 0.7)
    ax.axis("off")
    save(fig, "checkpoint_protocol.png")


def fig_muon() -> None:
    fig, (ax_poly, ax_sv) = plt.subplots(1, 2, figsize=(11, 4.2))
    s = torch.linspace(0, 1, 500)
    for steps in (1, 2, 3, 5):
        ax_poly.plot(s, newton_schulz_polynomial(s, steps), label=f"{steps} step{'s' * (steps > 1)}")
    describe(ax_poly, "singular value in (after scaling by the Frobenius norm)", "singular value out",
             "the Newton–Schulz quintic, iterated")
    grad = cpu_model_gradient("layers.0.mlp.gate_proj.weight")
    before = torch.linalg.svdvals(grad)
    ax_sv.semilogy(before / before[0], label="gradient (scaled to top = 1)")
    ax_sv.semilogy(torch.linalg.svdvals(muon_update(grad)), label="Muon's update")
    describe(ax_sv, "index (largest first)", "singular value",
             "layers.0.mlp.gate_proj (352 x 128) of the CPU config")
    save(fig, "muon.png")


def fig_decoding() -> None:
    fig, (ax_spec, ax_int8) = plt.subplots(1, 2, figsize=(11, 4.2))
    alphas = [i / 100 for i in range(101)]
    for k in (2, 4, 6):
        ax_spec.plot(alphas, [tokens_per_round(a, k) for a in alphas], label=f"k = {k}")
    describe(ax_spec, "acceptance rate of a drafted token", "tokens per target forward",
             "speculative decoding: (1 - a^(k+1)) / (1 - a)")
    stories = ROOT.parent / "shared" / "data" / "stories260K.bin"
    if stories.is_file():
        weight, source = read_llama2c(stories).layers[0].mlp.gate_proj.weight.detach(), "stories260K gate_proj (layer 0)"
    else:
        torch.manual_seed(0)
        weight, source = Llama(ModelConfig(**BENCH_CONFIG)).layers[0].mlp.gate_proj.weight.detach(), "random init"
    quantized = Int8Linear(weight)
    error = (weight - quantized.int8_weight().float() * quantized.scales[:, None]) / quantized.scales[:, None]
    ax_int8.hist(error.flatten(), bins=60, label=f"{weight.numel():,} weights")
    describe(ax_int8, "w - scale * round(w / scale), in units of its row's scale", "weights",
             f"int8 rounding error: {source}")
    save(fig, "decoding.png")


def fig_loss_curve() -> None:
    runs = sorted(ROOT.glob("out/*/metrics.jsonl"), key=lambda p: len(p.read_text().splitlines()))
    if not runs:
        print("note: no out/*/metrics.jsonl (train a run first); skipped loss_curve.png")
        return
    metrics = [json.loads(line) for line in runs[-1].read_text().splitlines() if line]
    steps = [m for m in metrics if m["kind"] == "train" and not m["skipped"]]
    evals = [m for m in metrics if m["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.8, alpha=0.6, label="train (batch)")
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="val")
    describe(ax, "step", "cross-entropy loss", str(runs[-1].parent.relative_to(ROOT)))
    save(fig, "loss_curve.png")


def fig_parallel_memory() -> None:
    from config import build_config, load_toml
    cfg = build_config(load_toml(RECIPE_1B))
    with torch.device("meta"):
        model = Llama(cfg.model)
    params, block = model.num_params(), sum(p.numel() for p in model.layers[0].parameters())
    tokens = cfg.train.micro_batch_size * cfg.train.block_size
    checkpointed = cfg.model.n_layers * tokens * cfg.model.dim * 2 / 1e9  # bf16 block inputs
    gpus = [1, 2, 4, 8, 16, 32, 64]
    ddp = [training_state_bytes(params) / 1e9] * len(gpus)
    fsdp = [training_state_bytes(params) / n / 1e9 + 2 * block * 2 / 1e9 for n in gpus]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(gpus, ddp, "o-", label="DDP: weights, gradients, AdamW state (16 B/param) on every GPU")
    ax.plot(gpus, fsdp, "o-", label="FSDP: 16 B/param / GPUs + two gathered bf16 blocks")
    ax.axhline(checkpointed, color="gray", ls="--",
               label=f"+ activations with checkpointing ({checkpointed:.2f} GB at micro-batch {tokens:,} tokens)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(gpus, [str(n) for n in gpus])
    ax.set_ylim(0, 26)  # room for the legend above the lines
    describe(ax, "GPUs", "GB per GPU", "Training memory per GPU, TinyLlama-1.1B shape (configs/llama_1b_fsdp.toml)")
    ax.legend(loc="upper right")
    save(fig, "parallel_memory.png")


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    start = time.perf_counter()
    for draw in (fig_rmsnorm, fig_rope, fig_masks, fig_kv_cache_memory, fig_decode_cost, fig_lr_schedules,
                 fig_precision, fig_online_softmax, fig_swiglu, fig_sampling, fig_bpe, fig_checkpoint_protocol,
                 fig_muon, fig_decoding, fig_loss_curve, fig_parallel_memory):
        draw()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
