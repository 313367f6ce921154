"""How long scaled-dot-product attention takes on this GPU, and the shape-aware price fitted to
it: the attention shapes of the Hugging Face models (issue 15) and of autopar's GPT runs,
variants of them, and sweeps of sequence length and head dim.

The cost model prices attention by the work its kernel does (`attention_kernel_flops` in
autopar/planning/cost.py: sequences and head dims padded to the kernel's tiles, the blocks a
causal mask leaves) at an efficiency that depends on the key length and the head dim
(`attention_efficiency`), times a factor for a causal mask and one for dropout. This script
measures, for each shape, the forward and the forward + backward (CUDA events, medians after
warm-up; forward with autograd recording, as in training) and the backend torch chose, then
fits that curve (`fit`): per part (forward, backward) the efficiency and its two half points,
least squares on log time over the shapes without a mask, causal or dropout, the tiles chosen
from a small set; then the causal and dropout factors, each the geometric mean of measured over
priced on the shapes that have it. Each row also carries the flat price the device file had
before (`calibration.ops`: one efficiency on model FLOPs, causal not discounted).

    python benchmarks/attention_times.py --json $OUT/attention-times.json \
        --write-device autopar/data/devices/h200-141g.json     # GPU: measure, fit, write
    python benchmarks/attention_times.py --fit attention-times.json   # refit saved rows

The inputs are laid out as the models make them ((B, S, H, D) projections seen as (B, H, S, D)),
random bf16, not rotated: attention is compute-bound, and its inputs (at most 64 MiB each here)
are read once per query tile either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import autopar
from autopar.cluster import ATTENTION_KEYS, DeviceSpec
from autopar.planning import cost
from autopar.planning.profile import Attention

SDPA_OP = "aten.scaled_dot_product_attention.default"
NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}
PARTS = ("forward", "backward")

# label -> (batch, heads, seq, head dim, key/value heads, dropout, causal)
CASES = {
    # the Hugging Face models of benchmarks/hf_one_gpu.py, as they run there
    "hf-vit-1b": (64, 16, 257, 88, 16, 0.0, False),
    "hf-bert-1b": (32, 28, 512, 64, 28, 0.1, False),
    "hf-llama-1b": (8, 32, 2048, 64, 4, 0.0, True),
    # autopar's GPT runs on one GPU (docs/benchmarks/2026-12-04-single-h200-breakdown)
    "gpt-1.3b": (8, 16, 2048, 128, 16, 0.0, True),
    "gpt-2.7b": (8, 32, 2048, 80, 32, 0.0, True),
    "gpt-6.7b, 2 microbatches": (4, 32, 2048, 128, 32, 0.0, True),
    # variants of them
    "vit, 256 tokens": (64, 16, 256, 88, 16, 0.0, False),
    "bert, no dropout": (32, 28, 512, 64, 28, 0.0, False),
    "llama, not causal": (8, 32, 2048, 64, 4, 0.0, False),
    "llama, 32 kv heads": (8, 32, 2048, 64, 32, 0.0, True),
    "vit-b/16 197 tokens": (128, 12, 197, 64, 12, 0.0, False),
}
# head dims at three sequence lengths, 16384 tokens of 16 heads
for _s in (257, 512, 2048):
    for _d in (64, 80, 88, 96, 128):
        CASES[f"head dim d{_d} s{_s}"] = (16384 // _s, 16, _s, _d, 16, 0.0, False)
# sequence lengths, with and without a causal mask, 16384 tokens of 16 heads
for _d in (64, 128):
    for _s in (128, 192, 256, 384, 512, 768, 1024, 2048, 4096):
        for _c in (False, True):
            CASES[f"seq d{_d} s{_s}{' causal' if _c else ''}"] = (
                max(16384 // _s, 1), 16, _s, _d, 16, 0.0, _c)
# dropout
for _s, _d in ((257, 88), (1024, 128), (2048, 64)):
    CASES[f"dropout d{_d} s{_s}"] = (16384 // _s, 16, _s, _d, 16, 0.1, False)


def attention_shape(row: dict) -> Attention:
    return Attention(batch_heads=row["batch"] * row["heads"], seq_q=row["seq"],
                     seq_k=row["seq"], head_dim=row["head_dim"], head_dim_v=row["head_dim"],
                     causal=row["causal"], dropout_p=row["dropout_p"], masked=False)


# -- measuring -----------------------------------------------------------------------------------


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


def measure(label, case, reps: int) -> dict:
    import torch.nn.functional as F

    b, h, s, d, hkv, p, causal = case
    q, k, v = inputs(b, h, s, d, hkv, torch.device("cuda"))
    gqa = hkv != h
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)

    def fwd():  # autograd records, as in training (the kernel keeps its log-sum-exp)
        F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, enable_gqa=gqa)

    def fwd_bwd():  # autograd.grad: no accumulation into .grad between repeats
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal,
                                             enable_gqa=gqa)
        torch.autograd.grad(out, (q, k, v), grad)

    backend = int(torch._fused_sdp_choice(q, k, v, None, p, causal, enable_gqa=gqa))
    fwd_s, total_s = median_s(fwd, reps), median_s(fwd_bwd, reps)
    return dict(label=label, batch=b, heads=h, seq=s, head_dim=d, kv_heads=hkv, dropout_p=p,
                causal=causal, backend=NAMES.get(backend, backend),
                forward_s=fwd_s, forward_backward_s=total_s, backward_s=total_s - fwd_s)


# -- fitting ---------------------------------------------------------------------------------------

TILES = (1, 16, 32, 64, 128)
HEAD_DIM_TILES = (1, 8, 16, 32, 64)
SEQ_HALVES = (0.0,) + tuple(4 * 2 ** (i / 4) for i in range(45))  # 4 .. 8192 tokens
HEAD_DIM_HALVES = (0.0,) + tuple(2 * 2 ** (i / 4) for i in range(37))  # 2 .. 1024


def _device_with(spec, curve: dict):
    cal = spec.calibration.to_dict() if spec.calibration else {}
    cal["attention"] = curve
    return DeviceSpec(name=spec.name, memory_bytes=spec.memory_bytes,
                              peak_flops=dict(spec.peak_flops),
                              hbm_bandwidth_bytes_per_s=spec.hbm_bandwidth_bytes_per_s,
                              calibration=cal)


def _fit_part(rows, part, tile, dtile, peak, fixed):
    """(squared log error, efficiency, seq_half, head_dim_half) of the best curve for `part` on
    `rows` with these tiles (a row's fixed causal and dropout factors applied); None if every
    curve needs an efficiency above 1."""
    import numpy as np

    def known(r):  # the row's factors that the fit takes as given
        return ((fixed[f"{part}_causal"] if r["causal"] else 1.0)
                * (fixed[f"{part}_dropout"] if r["dropout_p"] else 1.0))

    y, s, d = (np.array(v, dtype=float) for v in zip(*(
        (math.log(cost.attention_kernel_flops(attention_shape(r), part, tile, dtile) * known(r)
                  / peak / r[f"{part}_s"]),
         -(-r["seq"] // tile) * tile, -(-r["head_dim"] // dtile) * dtile) for r in rows)))
    sh = np.array(SEQ_HALVES)[:, None, None]
    dh = np.array(HEAD_DIM_HALVES)[None, :, None]
    # each row's log efficiency once its shape's two factors are divided out
    ys = y - np.log(s / (s + sh)) - np.log(d / (d + dh))
    mean = ys.mean(axis=2)
    err = ((ys - mean[..., None]) ** 2).sum(axis=2)
    err[mean > 0] = np.inf  # efficiency above 1: not a curve a kernel can follow
    i, j = np.unravel_index(np.argmin(err), err.shape)
    if not np.isfinite(err[i, j]):
        return None
    return float(err[i, j]), float(np.exp(mean[i, j])), SEQ_HALVES[i], HEAD_DIM_HALVES[j]


def fit(rows: list[dict], peak: float, fixed: dict | None = None) -> dict:
    """The attention curve (`Calibration.attention`) that prices `rows` best (module doc).

    `fixed`: curve entries taken as given, for rows too few to tell them apart (a tile, a
    causal or dropout factor). Rows with a causal mask (or dropout) join the fit of the curve
    itself when both parts' causal (dropout) factors are given; otherwise those factors are
    fitted after the curve, from the rows that have them."""
    fixed = dict(fixed or {})
    given = {f: all(f"{p}_{f}" in fixed for p in PARTS) for f in ("causal", "dropout")}
    pins = {f"{p}_{f}": fixed.get(f"{p}_{f}", 1.0) for p in PARTS for f in ("causal", "dropout")}
    fused = [r for r in rows if r["backend"] != "math"]
    base = [r for r in fused if (given["causal"] or not r["causal"])
            and (given["dropout"] or not r["dropout_p"])]
    best = None
    for tile in (fixed["tile"],) if "tile" in fixed else TILES:
        for dtile in (fixed["head_dim_tile"],) if "head_dim_tile" in fixed else HEAD_DIM_TILES:
            parts = [_fit_part(base, p, int(tile), int(dtile), peak, pins) for p in PARTS]
            if any(p is None for p in parts):
                continue
            err = sum(p[0] for p in parts)
            if best is None or err < best[0]:
                best = (err, tile, dtile, parts)
    _, tile, dtile, parts = best
    curve = {"tile": float(tile), "head_dim_tile": float(dtile), **pins}
    for part, (_, eff, sh, dh) in zip(PARTS, parts):
        curve.update({f"{part}_efficiency": eff, f"{part}_seq_half": sh,
                      f"{part}_head_dim_half": dh})

    def factor(feature, subset):
        """Each part's factor for `feature` unless given: measured over priced, geometric mean."""
        spec = DeviceSpec(name="fit", memory_bytes=1, peak_flops={"bfloat16": peak},
                          hbm_bandwidth_bytes_per_s=1.0, calibration={"attention": curve})
        for part in PARTS:
            key = f"{part}_{feature}"
            if key in fixed or not subset:
                continue
            ratios = [r[f"{part}_s"] / cost.attention_time_s(attention_shape(r), spec,
                                                             "bfloat16", part) for r in subset]
            curve[key] = math.exp(statistics.fmean(math.log(x) for x in ratios))

    factor("causal", [r for r in fused if r["causal"] and not r["dropout_p"]])
    factor("dropout", [r for r in fused if r["dropout_p"]])
    return {k: float(f"{curve[k]:.4g}") for k in ATTENTION_KEYS}


def priced(rows: list[dict], before, after) -> None:
    """Add each row's price before (the flat `calibration.ops` efficiency on model FLOPs) and
    after (the fitted curve), and measured over each."""
    for r in rows:
        a = attention_shape(r)
        model_flops = a.fwd_flops + a.bwd_flops
        r["model_flops"] = model_flops
        r["kernel_flops"] = sum(cost.attention_kernel_flops(
            a, part, int(after.calibration.attention["tile"]),
            int(after.calibration.attention["head_dim_tile"])) for part in PARTS)
        io = 2 * (2 * r["batch"] * r["heads"] + 2 * r["batch"] * r["kv_heads"]) * r["seq"] * \
            r["head_dim"]  # q, k, v and the output, bf16
        r["price_before_s"] = cost.compute_time_s(model_flops, 3 * io, before, "bfloat16",
                                                  op=SDPA_OP)
        r["price_forward_s"] = cost.attention_time_s(a, after, "bfloat16", "forward")
        r["price_backward_s"] = cost.attention_time_s(a, after, "bfloat16", "backward")
        r["price_s"] = r["price_forward_s"] + r["price_backward_s"]
        r["measured_over_before"] = r["forward_backward_s"] / r["price_before_s"]
        r["measured_over_price"] = r["forward_backward_s"] / r["price_s"]
        peak = after.peak_flops_for("bfloat16")
        r["efficiency_on_model_flops"] = model_flops / r["forward_backward_s"] / peak
        r["efficiency_on_kernel_flops"] = r["kernel_flops"] / r["forward_backward_s"] / peak


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':28} {'backend':8} {'fwd ms':>8} {'fwd+bwd ms':>10} {'price ms':>9} "
             f"{'meas/price':>10} {'meas/before':>11} {'eff kernel':>10}"]
    for r in rows:
        lines.append(
            f"{r['label']:28} {r['backend']:8} {r['forward_s'] * 1e3:8.3f} "
            f"{r['forward_backward_s'] * 1e3:10.3f} {r['price_s'] * 1e3:9.3f} "
            f"{r['measured_over_price']:10.3f} {r['measured_over_before']:11.3f} "
            f"{r['efficiency_on_kernel_flops']:10.3f}")
    ratios = [r["measured_over_price"] for r in rows]
    lines.append(f"measured / price over {len(rows)} shapes: median "
                 f"{statistics.median(ratios):.3f}, range {min(ratios):.3f} .. {max(ratios):.3f}")
    return "\n".join(lines)


def write_device(path: str, curve: dict, note: str) -> None:
    """Put the curve into the device file's calibration, saying where it came from."""
    data = json.load(open(path))
    cal = data["device"].setdefault("calibration", {})
    cal["attention"] = curve
    source = cal.get("source", "")
    cal["source"] = (source.split("; attention: ")[0] + ("; " if source else "")
                     + "attention: " + note)
    autopar.Cluster.from_dict(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"wrote the attention curve into {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the rows and the fit here")
    ap.add_argument("--fit", default=None, metavar="JSON", help="refit the rows of a saved run")
    ap.add_argument("--write-device", default=None, metavar="DEVICE_JSON",
                    help="put the fitted curve into this device file's calibration")
    args = ap.parse_args(argv)
    if args.fit:
        data = json.load(open(args.fit))
        rows = data["rows"]
        spec = autopar.Cluster.preset(data["cluster"]).device
        header = {k: v for k, v in data.items() if k not in ("rows", "fit", "fixed")}
    else:
        spec = autopar.Cluster.detect().device
        header = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "cudnn": torch.backends.cudnn.version(),
                  "cluster": autopar.Cluster.detect().name}
        rows = []
        for label, case in CASES.items():
            rows.append(measure(label, case, args.reps))
            r = rows[-1]
            print(f"{label:28} {r['backend']:8} fwd {r['forward_s'] * 1e3:8.3f} ms  fwd+bwd "
                  f"{r['forward_backward_s'] * 1e3:8.3f} ms", flush=True)
    peak = spec.peak_flops_for("bfloat16")
    fixed = data.get("fixed", {}) if args.fit else {}
    curve = fit(rows, peak, fixed)
    before = spec
    if spec.calibration and spec.calibration.attention:  # the flat price, as it was before
        cal = spec.calibration.to_dict()
        cal.pop("attention")
        before = DeviceSpec(name=spec.name, memory_bytes=spec.memory_bytes,
                                    peak_flops=dict(spec.peak_flops),
                                    hbm_bandwidth_bytes_per_s=spec.hbm_bandwidth_bytes_per_s,
                                    calibration=cal)
    after = _device_with(spec, curve)
    priced(rows, before, after)
    print(table(rows))
    print("fit:", json.dumps(curve))
    header.update(peak_bf16_flops=peak,
                  flat_sdpa_efficiency=(before.calibration.ops.get(SDPA_OP)
                                        if before.calibration else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header, fixed=fixed, fit=curve, rows=rows), f, indent=1)
    if args.write_device:
        note = (f"benchmarks/attention_times.py --fit {os.path.basename(args.fit or args.json or '')}"
                f" ({header['date']}, {header['device']}, torch {header['torch']}, cuDNN "
                f"{header['cudnn']})")
        write_device(args.write_device, curve, note)


if __name__ == "__main__":
    main()
