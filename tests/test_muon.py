"""Our Muon against torch.optim.Muon: bf16 orthogonalization bit for bit, fp32 within bf16's
rounding; and the precision choice under an AVX2-only CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devices import bf16_matmul_is_native
from muon import Muon

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(96, 32), (32, 96), (48, 48)]  # tall (transposed inside), wide, square


def three_steps(optimizer_class: type, **kwargs) -> list[torch.Tensor]:
    """What three steps on fixed random gradients change in each matrix."""
    torch.manual_seed(0)
    start = [torch.randn(shape) * 0.02 for shape in SHAPES]
    params = [torch.nn.Parameter(w.clone()) for w in start]
    optimizer = optimizer_class(params, lr=0.02, momentum=0.95, weight_decay=0.01, **kwargs)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        optimizer.step()
    return [p.detach() - w for p, w in zip(params, start)]


def test_bf16_orthogonalization_is_torchs_update_bit_for_bit():
    for ours, torchs in zip(three_steps(Muon, ns_dtype=torch.bfloat16), three_steps(torch.optim.Muon)):
        assert torch.equal(ours, torchs)


def test_fp32_orthogonalization_is_torchs_update_within_bf16_rounding():
    for ours, torchs in zip(three_steps(Muon, ns_dtype=torch.float32), three_steps(torch.optim.Muon)):
        assert not torch.equal(ours, torchs)  # it did run in another precision
        assert ((ours - torchs).norm() / torchs.norm()).item() < 0.03


def test_state_loads_into_torchs_muon_and_back():
    params = [torch.nn.Parameter(torch.randn(8, 4))]
    params[0].grad = torch.randn(8, 4)
    ours = Muon(params, ns_dtype=torch.float32, lr=0.01)
    ours.step()
    theirs = torch.optim.Muon(params, lr=0.01)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.state[params[0]]["momentum_buffer"], ours.state[params[0]]["momentum_buffer"])


def test_avx2_only_cpu_orthogonalizes_in_fp32_and_warns_of_bf16():
    """ATEN_CPU_CAPABILITY and DNNL_MAX_CPU_ISA make any x86 CPU behave as an AVX2-only one, where
    a bf16 matmul is emulated: training picks fp32 for Muon, and a bf16 request gets one warning line."""
    code = ("import torch, train, devices; from config import TrainConfig; from model import Llama, ModelConfig\n"
            "model = Llama(ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8))\n"
            "optimizers = train.configure_optimizers(model, TrainConfig(optimizer='muon'), torch.device('cpu'))\n"
            "print(optimizers['Muon'].ns_dtype)\n"
            "devices.checked_dtype(torch.device('cpu'), 'bfloat16', 'train.dtype')")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.float32"
    assert result.stderr.splitlines() == ["warning: train.dtype=bfloat16 on a CPU without native bf16 matmuls "
                                          "(AVX2 or older): they are emulated, tens of times slower than float32"]
    assert f"\n{result.stderr}" in (ROOT / "docs" / "devices.md").read_text()  # quoted as printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpus_with_bf16_tensor_cores_keep_bf16():
    assert bf16_matmul_is_native(torch.device("cuda")) == torch.cuda.is_bf16_supported(including_emulation=False)
