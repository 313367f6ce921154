"""How long scaled-dot-product attention takes on this GPU, against what autopar's cost model
charges it: the three Hugging Face models' attention shapes, variants of them, and a sweep of
sequence lengths at a fixed token count.

The cost model counts attention's FLOPs as torch's flop counter does (forward 4·B·H·Sq·Sk·D,
backward 10·B·H·Sq·Sk·D, causal masking not discounted; autopar/planning/profile.py) and prices
them with one calibrated efficiency for every shape (`calibration.ops` of the device file,
autopar.planning.cost.compute_time_s). Each row here has the measured forward and
forward+backward medians (CUDA events, after warm-up), the backend torch chose, the cost
model's time for the same op, and the efficiency the kernel reached on the counted FLOPs.

    python docs/benchmarks/2026-12-06-hf-one-gpu/attention_times.py --json $OUT/attn.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import autopar
from autopar.planning.cost import compute_time_s

SDPA_OP = "aten.scaled_dot_product_attention.default"
NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}

# label -> (batch, heads, seq, head dim, key/value heads, dropout, causal)
CASES = {
    "hf-vit-1b": (64, 16, 257, 88, 16, 0.0, False),
    "vit, 256 tokens": (64, 16, 256, 88, 16, 0.0, False),
    "vit, head dim 64": (64, 16, 257, 64, 16, 0.0, False),
    "vit, head dim 128": (64, 16, 257, 128, 16, 0.0, False),
    "hf-bert-1b": (32, 28, 512, 64, 28, 0.1, False),
    "bert, no dropout": (32, 28, 512, 64, 28, 0.0, False),
    "hf-llama-1b": (8, 32, 2048, 64, 4, 0.0, True),
    "llama, not causal": (8, 32, 2048, 64, 4, 0.0, False),
}
for _d in (64, 128):
    for _s in (128, 256, 512, 1024, 2048, 4096):
        for _c in (False, True):
            CASES[f"sweep d{_d} s{_s}{' causal' if _c else ''}"] = (
                16384 // _s, 16, _s, _d, 16, 0.0, _c)


def inputs(b, h, s, d, hkv, device):
    """q, k, v as the models make them: (B, S, H, D) projections seen as (B, H, S, D)."""
    def one(heads):
        return (torch.randn(b, s, heads, d, device=device, dtype=torch.bfloat16)
                .transpose(1, 2).requires_grad_())
    return one(h), one(hkv), one(hkv)


def median_s(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) / 1e3 for s, e in times)


def measure(label, case, spec, reps: int) -> dict:
    b, h, s, d, hkv, p, causal = case
    q, k, v = inputs(b, h, s, d, hkv, torch.device("cuda"))
    gqa = hkv != h
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal,
                                           enable_gqa=gqa)

    def fwd_bwd():  # autograd.grad: no accumulation into .grad between repeats
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal,
                                             enable_gqa=gqa)
        torch.autograd.grad(out, (q, k, v), grad)

    backend = int(torch._fused_sdp_choice(q, k, v, None, p, causal, enable_gqa=gqa))
    fwd_s, total_s = median_s(fwd, reps), median_s(fwd_bwd, reps)
    counted = 2 * b * h * s * s * (d + d)  # forward, as the cost model counts it
    counted_bwd = 2 * b * h * s * s * (3 * d + 2 * d)
    io = 2 * (2 * q.numel() + k.numel() + v.numel())  # q, k, v and the output, bf16
    predicted_fwd = compute_time_s(counted, io, spec, torch.bfloat16, op=SDPA_OP)
    predicted_bwd = compute_time_s(counted_bwd, 2 * io, spec, torch.bfloat16, op=SDPA_OP)
    peak = spec.peak_flops_for(torch.bfloat16)
    return dict(label=label, batch=b, heads=h, seq=s, head_dim=d, kv_heads=hkv, dropout_p=p,
                causal=causal, backend=NAMES.get(backend, backend),
                forward_s=fwd_s, forward_backward_s=total_s,
                counted_flops=counted + counted_bwd,
                predicted_forward_s=predicted_fwd,
                predicted_forward_backward_s=predicted_fwd + predicted_bwd,
                measured_over_predicted=total_s / (predicted_fwd + predicted_bwd),
                efficiency_on_counted_flops=(counted + counted_bwd) / total_s / peak)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    spec = autopar.Cluster.detect().device
    rows = []
    for label, case in CASES.items():
        row = measure(label, case, spec, args.reps)
        rows.append(row)
        print(f"{label:26} {row['backend']:9} fwd {row['forward_s'] * 1e3:8.3f} ms  fwd+bwd "
              f"{row['forward_backward_s'] * 1e3:8.3f} ms  predicted "
              f"{row['predicted_forward_backward_s'] * 1e3:8.3f} ms  "
              f"x{row['measured_over_predicted']:5.2f}  "
              f"eff {row['efficiency_on_counted_flops']:.3f}", flush=True)
    if args.json:
        cal = spec.calibration
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cudnn": torch.backends.cudnn.version(),
                       "peak_bf16_flops": spec.peak_flops_for(torch.bfloat16),
                       "calibrated_sdpa_efficiency": cal.ops.get(SDPA_OP) if cal else None,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
