"""Does a model traced on the meta device (as offline planning traces it) give the graph it
traces to on this machine's accelerator? A plan is fingerprinted against the graph, so a plan
made offline runs here only if they are equal. Prints, per model, both fingerprints and where
the two graphs part; with --dump DIR, writes both node lists (one line per node, as the
fingerprint hashes it) for a diff.

    python benchmarks/compare_traces.py gpt-1.3b llama-8b --dump /tmp/traces

Uses benchmarks/multigpu.py's models, at its default batch for --gpus GPUs (8 sequences of
2048 tokens per GPU), in bf16, with its loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from autopar.models.losses import lm_loss
from autopar.trace import fingerprint_line, trace
from benchmarks.lib.models import MODELS, meta_model, model_spec


def node_lines(model, batch: int, seq: int, device) -> tuple[str, list[str]]:
    x = torch.zeros(batch, seq, dtype=torch.long, device=device)
    traced = trace(model, (x,), loss_fn=lm_loss, target=x.clone())
    return traced.fingerprint, [fingerprint_line(n) for n in traced.graph_module.graph.nodes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", choices=list(MODELS))
    ap.add_argument("--gpus", type=int, default=2, help="sets the global batch (default 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dump", default=None, metavar="DIR", help="write both node lists here")
    args = ap.parse_args(argv)
    differ = 0
    for name in args.models:
        spec = model_spec(name, False, 2048)
        batch = 8 * args.gpus
        meta_fp, meta = node_lines(meta_model(spec, torch.bfloat16), batch, 2048, "meta")
        model = spec.build(torch.device(args.device), torch.float32).to(torch.bfloat16)
        real_fp, real = node_lines(model, batch, 2048, args.device)
        del model
        same = meta_fp == real_fp
        differ += not same
        print(
            f"{name}: meta {meta_fp[:12]}, {args.device} {real_fp[:12]}: "
            f"{'equal' if same else 'DIFFERENT'} ({len(meta)} / {len(real)} nodes), "
            f"torch {torch.__version__}"
        )
        parted = [(i, a, b) for i, (a, b) in enumerate(zip(meta, real)) if a != b]
        for i, a, b in parted[:5]:
            print(f"  node {i}:\n    meta: {a}\n    {args.device}: {b}")
        if len(parted) > 5:
            print(f"  ... {len(parted) - 5} more differing nodes")
        if args.dump:
            out = Path(args.dump)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}_meta.txt").write_text("\n".join(meta) + "\n")
            (out / f"{name}_{args.device}.txt").write_text("\n".join(real) + "\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
