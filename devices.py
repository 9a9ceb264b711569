"""Which device a script runs on and which precisions it can do there: NVIDIA GPUs (cuda), Apple
GPUs (mps) and the CPU. train.py, generate.py, eval.py and app.py all choose through here.

`auto` takes the first of cuda, mps, cpu that this machine has. On MPS everything defaults to
fp32 and eager mode: bf16 (macOS 14 and newer) only when asked for, torch.compile only when asked
for, and the kernels PyTorch's MPS backend has got silently wrong are avoided (see model.py's
MPS_SAFE_DEVICES). Support for MPS is written from PyTorch's documentation and issues and tested
with MPS availability faked; nobody has run it on Apple hardware here.
"""

from __future__ import annotations

import sys

import torch

from config import ConfigError

def resolve(name: str, key: str) -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N or mps: config.check_device) stands for on this
    machine; `key` is the config key that set it, for the one-line error when there is no such device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but no CUDA GPU is visible: use --{key} {fallback()}")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name} but this machine shows {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0: pick one of those")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}=mps but this machine has no Apple GPU that PyTorch can use (MPS needs Apple "
                          f"silicon, macOS 12.3 or newer and a PyTorch built with MPS): use --{key} {fallback()}")
    return torch.device(name)


def fallback() -> str:
    """What to suggest instead of a device the machine lacks: its best one."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def can_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 at all (natively or emulated): CUDA GPUs that torch says
    can, Apple GPUs from macOS 14 on, every CPU (emulated, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)
    return True


def bf16_matmul_is_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run on native kernels here rather than an emulation slower
    than fp32: GPUs with bf16 tensor cores, and CPUs where oneDNN has bf16 kernels (AVX-512 or
    newer; it honours DNNL_MAX_CPU_ISA, so an AVX2 emulation reads as not native). A capability,
    not a timing, so a resumed run makes the same choice as the run it resumes."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False  # MPS: unknown speed, so fp32, the precision every backend multiplies correctly


def checked_dtype(device: torch.device, dtype: str, key: str) -> torch.dtype:
    """The torch dtype `dtype` names (float32, bfloat16, float16), refused in one line where the
    device cannot compute in it, and warned about in one line where it computes slowly."""
    if dtype == "bfloat16" and not can_bf16(device):
        where = "macOS before 14" if device.type == "mps" else f"this GPU ({torch.cuda.get_device_name(device)})"
        raise ConfigError(f"{key}=bfloat16 but {where} cannot compute in bf16: use --{key} float32"
                          + (" (or float16)" if device.type == "cuda" else ""))
    if dtype == "bfloat16" and device.type == "cpu" and not bf16_matmul_is_native(device):
        print(f"warning: {key}=bfloat16 on a CPU without native bf16 matmuls (AVX2 or older): they are emulated, "
              f"tens of times slower than float32", file=sys.stderr)
    return getattr(torch, dtype)


def synchronize(device: torch.device) -> None:
    """Wait until the device has done all the work queued on it (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
