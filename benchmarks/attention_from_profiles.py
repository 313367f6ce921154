"""Attention times from committed torch.profiler tables, as rows of benchmarks/attention_times.py:
the forward and backward of the attention op in real training steps, for fitting the attention
curve where no sweep was run.

Each source is one system's section of a profile text that benchmarks/hf_one_gpu.py or
benchmarks/multigpu.py wrote with --profile ("==== MODEL SYSTEM ..." and its tables), and the
shape its attention ran at (the model's heads and head dim, the microbatch the plan ran). A
row's forward and backward are the self CUDA time of `aten::_cudnn_attention_forward` and
`aten::_cudnn_attention_backward` over their calls (the backward's own kernels included: the
dO.O product and the dQ conversion). Profiled kernels run as long as unprofiled ones; the
host's overhead does not enter.

    python benchmarks/attention_from_profiles.py --json rows.json --fixed tile=128 ...
    python benchmarks/attention_times.py --fit rows.json --write-device DEVICE_JSON
"""

from __future__ import annotations

import argparse
import json

from autopar.cluster import ATTENTION_KEYS

H200_1206 = "docs/benchmarks/2026-12-06-hf-one-gpu/hf-llama-bert-vit-vs-eager-profiles.txt"
H200_1204 = "docs/benchmarks/2026-12-04-single-h200-breakdown/"

# label -> (profile, section, (batch, heads, seq, head dim, key/value heads, dropout, causal)),
# all on one H200, torch 2.11.0+cu130, cuDNN attention; the models' shapes are in
# benchmarks/hf_one_gpu.py and benchmarks/lib/models.py, the microbatches in each report
H200 = {
    "hf-vit-1b": (H200_1206, "hf-vit-1b autopar", (64, 16, 257, 88, 16, 0.0, False)),
    "hf-bert-1b": (H200_1206, "hf-bert-1b autopar", (32, 28, 512, 64, 28, 0.1, False)),
    "hf-llama-1b": (H200_1206, "hf-llama-1b autopar", (8, 32, 2048, 64, 4, 0.0, True)),
    "gpt-1.3b": (H200_1204 + "gpt-1.3b-6.7b-breakdown-profiles.txt", "gpt-1.3b autopar",
                 (8, 16, 2048, 128, 16, 0.0, True)),
    "gpt-2.7b": (H200_1204 + "gpt-1.3b-2.7b-vs-eager-double-counted-breakdown-profiles.txt",
                 "gpt-2.7b autopar", (8, 32, 2048, 80, 32, 0.0, True)),
    "gpt-6.7b, microbatch 2": (H200_1204 + "gpt-1.3b-6.7b-breakdown-profiles.txt",
                               "gpt-6.7b autopar", (2, 32, 2048, 128, 32, 0.0, True)),
    "gpt-6.7b, microbatch 4": (H200_1204 + "gpt-6.7b-corrected-cost-model-profiles.txt",
                               "gpt-6.7b autopar", (4, 32, 2048, 128, 32, 0.0, True)),
}
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _seconds(text: str) -> float:
    for unit in ("ms", "us", "ns", "s"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * UNITS[unit]
    raise ValueError(f"not a time: {text!r}")


def op_times(path: str, section: str) -> dict[str, tuple[float, int]]:
    """op name -> (self CUDA seconds, calls) from the first table of `section` in `path`."""
    found: dict[str, tuple[float, int]] = {}
    inside = False
    for line in open(path):
        if line.startswith("==== "):
            if inside:
                break
            inside = line.startswith(f"==== {section} ") or line.startswith(f"==== {section}:")
            continue
        cols = line.split()
        if inside and len(cols) >= 11 and cols[0].startswith("aten::"):
            # ... Self CUDA, Self CUDA %, CUDA total, CUDA time avg, # of Calls
            found.setdefault(cols[0], (_seconds(cols[-5]), int(cols[-1])))
    if not found:
        raise ValueError(f"no section {section!r} in {path}")
    return found


def rows(sources: dict) -> list[dict]:
    out = []
    for label, (path, section, (b, h, s, d, hkv, p, causal)) in sources.items():
        ops = op_times(path, section)
        (fwd, nf), (bwd, nb) = (ops[f"aten::_cudnn_attention_{part}"]
                                for part in ("forward", "backward"))
        out.append(dict(label=label, batch=b, heads=h, seq=s, head_dim=d, kv_heads=hkv,
                        dropout_p=p, causal=causal, backend="cudnn",
                        forward_s=fwd / nf, backward_s=bwd / nb,
                        forward_backward_s=fwd / nf + bwd / nb,
                        source=f"{path}: '{section}', {nf} forward and {nb} backward calls"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--fixed", nargs="*", default=[], metavar="KEY=VALUE",
                    help="curve entries the fit takes as given (attention_times.fit)")
    args = ap.parse_args(argv)
    fixed = {}
    for item in args.fixed:
        key, _, value = item.partition("=")
        if key not in ATTENTION_KEYS:
            ap.error(f"--fixed {key}: not one of {ATTENTION_KEYS}")
        fixed[key] = float(value)
    data = {"date": "profiles of 2026-12-04 and 2026-12-06", "device": "NVIDIA H200",
            "torch": "2.11.0+cu130", "cudnn": "91900", "cluster": "h200-141g",
            "made_by": "benchmarks/attention_from_profiles.py", "fixed": fixed,
            "rows": rows(H200)}
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    for r in data["rows"]:
        print(f"{r['label']:24} fwd {r['forward_s'] * 1e6:8.1f} us  bwd "
              f"{r['backward_s'] * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
