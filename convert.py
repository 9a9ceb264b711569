"""Checkpoints in and out: our folders, Hugging Face Llama folders and llama2.c's legacy .bin files.

    python convert.py out/run/ model.bin          # newest checkpoint of a run -> llama2.c (run.c runs it)
    python convert.py stories260K.bin hf-folder/  # llama2.c -> a Hugging Face / nanollama folder

The legacy llama2.c file is 7 int32s (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is not shared with the embedding), then every
weight as float32 grouped by kind across layers, the RoPE tables run.c no longer reads, and the
classifier when unshared. Meta's RoPE rotates adjacent pairs (x0, x1), (x2, x3)... while we, like
Hugging Face, rotate halves (x_i, x_{i+head_dim/2}), so q and k rows are permuted on the way.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import torch

import checkpoint
from config import ConfigError, ModelConfig
from model import Llama, rope_cos_sin

HEADER = struct.Struct("<7i")
# run.c hard-codes these; a model trained with others would run there silently wrong.
LLAMA2C_ROPE_THETA, LLAMA2C_NORM_EPS = 10000.0, 1e-5


def rope_permute(w: torch.Tensor, n_heads: int, to_pairs: bool = False) -> torch.Tensor:
    """Reorder the rows of a q or k projection between Meta's adjacent-pair RoPE layout and our
    rotate-half layout (to_pairs=False: pairs -> halves, the permute of HF's Llama converter)."""
    rows, cols = w.shape
    split = (n_heads, 2, rows // n_heads // 2) if to_pairs else (n_heads, rows // n_heads // 2, 2)
    return w.reshape(*split, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_layout(cfg: ModelConfig, shared_classifier: bool) -> list[tuple[str | None, tuple[int, ...]]]:
    """(our parameter name, shape) of every array in a legacy file, in file order; None = RoPE table."""
    d, hd, kv = cfg.dim, cfg.head_dim, cfg.kv_heads * cfg.head_dim
    per_layer = [("input_layernorm", (d,)), ("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)),
                 ("self_attn.v_proj", (kv, d)), ("self_attn.o_proj", (d, d)), ("post_attention_layernorm", (d,)),
                 ("mlp.gate_proj", (cfg.ffn_dim, d)), ("mlp.down_proj", (d, cfg.ffn_dim)),
                 ("mlp.up_proj", (cfg.ffn_dim, d))]
    layout = [("embed_tokens.weight", (cfg.vocab_size, d))]
    layout += [(f"layers.{i}.{name}.weight", shape) for name, shape in per_layer for i in range(cfg.n_layers)]
    layout += [("norm.weight", (d,)), (None, (cfg.max_seq_len, hd // 2)), (None, (cfg.max_seq_len, hd // 2))]
    if not shared_classifier:
        layout.append(("lm_head.weight", (cfg.vocab_size, d)))
    return layout


def read_llama2c(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> Llama:
    """Load a legacy llama2.c checkpoint (as written by llama2.c's export.py --version 0)."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise ConfigError(f"{path} is too short to be a llama2.c checkpoint")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack_from(raw)
    try:
        cfg = ModelConfig(vocab_size=abs(vocab_size), dim=dim, n_layers=n_layers, n_heads=n_heads,
                          n_kv_heads=n_kv_heads, hidden_dim=hidden_dim, max_seq_len=seq_len,
                          norm_eps=LLAMA2C_NORM_EPS, rope_theta=LLAMA2C_ROPE_THETA, tie_embeddings=vocab_size > 0)
        cfg.validate()
    except (ConfigError, ZeroDivisionError):
        raise ConfigError(f"{path} has no valid llama2.c header (read {dim=} {n_heads=} {n_kv_heads=} "
                          f"{vocab_size=}): is it a legacy llama2.c .bin?") from None
    layout = llama2c_layout(cfg, shared_classifier=cfg.tie_embeddings)
    expected = HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if len(raw) != expected:
        raise ConfigError(f"{path} holds {len(raw)} bytes but its header (dim {dim}, {n_layers} layers, vocab "
                          f"{vocab_size}) needs {expected}: the file is truncated or not a legacy llama2.c file")
    floats = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=HEADER.size).copy())
    state, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        if name is not None:
            state[name] = floats[offset:offset + size].view(shape)
        offset += size
    for i in range(n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads)):
            key = f"layers.{i}.self_attn.{proj}.weight"
            state[key] = rope_permute(state[key], heads)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if max_seq_len is not None:
        cfg.max_seq_len = max_seq_len
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_cos_sin(cfg)
    return model


def write_llama2c(model: Llama, path: str | Path) -> None:
    """Write `model` as a legacy llama2.c checkpoint (float32), the classifier shared when tied."""
    cfg = model.cfg
    if cfg.rope_theta != LLAMA2C_ROPE_THETA or cfg.norm_eps != LLAMA2C_NORM_EPS or cfg.rope_scaling != "none":
        raise ConfigError(f"llama2.c fixes rope_theta={LLAMA2C_ROPE_THETA:g}, norm_eps={LLAMA2C_NORM_EPS:g} and no "
                          f"RoPE scaling, but this model has rope_theta={cfg.rope_theta:g}, norm_eps={cfg.norm_eps:g}, "
                          f"rope_scaling={cfg.rope_scaling}: it cannot run there")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    shared = cfg.tie_embeddings or torch.equal(state["embed_tokens.weight"], state["lm_head.weight"])
    for i in range(cfg.n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads)):
            key = f"layers.{i}.self_attn.{proj}.weight"
            state[key] = rope_permute(state[key], heads, to_pairs=True)
    half = cfg.head_dim // 2
    rope_tables = iter((model.rope_cos[:, :half].float().cpu(), model.rope_sin[:, :half].float().cpu()))
    with Path(path).open("wb") as f:
        f.write(HEADER.pack(cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads,
                            cfg.vocab_size if shared else -cfg.vocab_size, cfg.max_seq_len))
        for name, _ in llama2c_layout(cfg, shared):
            tensor = next(rope_tables) if name is None else state[name]
            f.write(tensor.contiguous().numpy().astype("<f4").tobytes())


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> Llama:
    """Any checkpoint we can run: a llama2.c .bin file or a (run / checkpoint / Hugging Face) folder."""
    path = Path(path)
    if path.is_file():
        return read_llama2c(path, dtype, max_seq_len)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist: give a checkpoint or run folder, a Hugging Face "
                          f"Llama folder or a llama2.c .bin file")
    return Llama.from_pretrained(checkpoint.resolve(path), dtype, max_seq_len)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0].startswith("-"):
        print("error: usage: python convert.py SRC DST (SRC: a checkpoint, run or Hugging Face folder or a "
              "llama2.c .bin; DST: NAME.bin for llama2.c, else a Hugging Face folder)", file=sys.stderr)
        sys.exit(2)
    source, target = argv
    try:
        model = load_model(source)
        if target.endswith(".bin"):
            write_llama2c(model, target)
        else:
            model.save_pretrained(target)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
