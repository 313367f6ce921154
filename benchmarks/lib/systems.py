"""The systems a benchmark run compares, by name: which configurations a `--systems` list
expands to for one model, and why any is left out.

A kind (`autopar`, `eager`, `compiled`, `fsdp2`, `tp`, `pp`) expands over --ac, --accum and
the tp and pp sizes that fit; a concrete name (`eager-ac-ga4`, `compiled-ac`, `tp4-fsdp2`,
`pp2-fsdp2-ac`) is that one configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from benchmarks.lib.models import ModelSpec


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # autopar | eager | compiled | fsdp2 | tp | pp
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ac: bool = False
    microbatches: int = 1  # pp: the schedule's; the others but autopar: gradient accumulation
    forced: bool = False  # pp named explicitly: run even where a baseline fits

    def config(self) -> dict:
        out = {
            "kind": self.kind,
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            "activation_checkpointing": self.ac,
            "microbatches": self.microbatches,
        }
        if self.kind == "pp":
            out["schedule"] = "1F1B"
        return out


KINDS = ("autopar", "eager", "compiled", "fsdp2", "tp", "pp")
# one-device kinds: a job of more than one process leaves them out with a note
ONE_DEVICE = ("eager", "compiled")
# a concrete system: eager, compiled, fsdp2, tpT-fsdp2 or ppP-fsdp2, then -ac, then -gaN
_NAME = re.compile(r"^(eager|compiled|fsdp2|tp(\d+)-fsdp2|pp(\d+)-fsdp2)(-ac)?(-ga(\d+))?$")


def check_system_token(token: str) -> str | None:
    """None if `token` names a kind or a concrete system, else what is wrong."""
    if token in KINDS:
        return None
    m = _NAME.match(token)
    if not m:
        return (
            f"{token!r} is neither a kind ({', '.join(KINDS)}) nor a system name such as "
            "eager-ac, compiled-ac-ga2, fsdp2-ga4, tp4-fsdp2-ac, pp2-fsdp2"
        )
    if m.group(3) and m.group(5):
        return f"{token!r}: a pipeline has its own microbatches (--pp-microbatches), no -ga"
    if m.group(6) and int(m.group(6)) < 1:
        return f"{token!r}: -gaN needs N >= 1"
    return None


def tp_sizes(spec: ModelSpec, local_world: int, wanted: list[int] | None) -> list[int]:
    """tp sizes > 1 inside one node that split heads, kv heads, vocabulary and widths evenly."""
    sizes = wanted or [t for t in range(2, local_world + 1) if local_world % t == 0]
    return [t for t in sizes if _tp_unfit(spec, local_world, t) is None]


def _tp_unfit(spec: ModelSpec, local_world: int, t: int) -> str | None:
    c = spec.config
    widths = {
        "d_model": c["d_model"],
        "vocab": c["vocab_size"],
        "ffn": c.get("ffn_hidden", 4 * c["d_model"]),
        "heads": spec.heads,
        "kv heads": spec.kv_heads,
    }
    if t < 2 or local_world % t:
        return f"tp {t} must be > 1 and divide the {local_world} devices of a node"
    bad = [k for k, v in widths.items() if v % t]
    return f"tp {t} does not divide {', '.join(bad)}" if bad else None


def _pp_unfit(spec, world, pp, batch, microbatches):
    """The number of microbatches for pp, or why pp cannot run."""
    if pp < 2 or world % pp:
        return f"pp must be > 1 and divide the world size {world}"
    if spec.config["n_layer"] < pp:
        return f"{spec.config['n_layer']} blocks cannot fill {pp} stages"
    dp = world // pp
    if batch % dp:
        return f"batch {batch} does not split over dp {dp}"
    local = batch // dp
    if microbatches:
        if local % microbatches or microbatches < pp:
            return (
                f"--pp-microbatches {microbatches} must divide the {local} samples per dp "
                f"rank and be >= pp {pp}"
            )
        return microbatches
    fits = [m for m in range(pp, 2 * pp + 1) if local % m == 0]
    if not fits:
        return (
            f"{local} samples per dp rank split into no number of microbatches in "
            f"[{pp}, {2 * pp}]; give --pp-microbatches or another batch"
        )
    return fits[-1]


def expand_systems(args, spec: ModelSpec, world: int, local_world: int, batch: int):
    """The systems to run for one model, in --systems order (hand pipelines last: whether
    they run depends on the others), and notes on what was left out and why."""
    acs = {"none": [False], "full": [True], "both": [False, True]}[args.ac]
    accums = args.accum
    out, notes, pipes = [], [], []

    def name(base, ac, ga):
        return base + ("-ac" if ac else "") + (f"-ga{ga}" if ga > 1 else "")

    def add(base, kind, ga, **kw):
        dp = kw.get("dp", 1)
        if batch % (dp * ga):
            notes.append(
                f"{spec.name}: {name(base, kw.get('ac', False), ga)} left out: batch "
                f"{batch} does not split into dp {dp} x {ga} microbatches"
            )
            return
        out.append(System(name(base, kw.get("ac", False), ga), kind, microbatches=ga, **kw))

    def add_pp(p, ac, forced):
        why = _pp_unfit(spec, world, p, batch, args.pp_microbatches)
        if isinstance(why, str):
            notes.append(f"{spec.name}: pp{p} left out: {why}")
            return
        pipes.append(
            System(
                name(f"pp{p}-fsdp2", ac, 1),
                "pp",
                pp=p,
                dp=world // p,
                ac=ac,
                microbatches=why,
                forced=forced,
            )
        )

    for token in args.systems:
        m = _NAME.match(token)
        if token == "autopar":
            out.append(System("autopar", "autopar", dp=world))
        elif token in ONE_DEVICE or (m and m.group(1) in ONE_DEVICE):
            kind = token if token in ONE_DEVICE else m.group(1)
            if world > 1:
                notes.append(f"{spec.name}: {kind} runs on one device only (world size {world})")
                continue
            for ac in acs if token == kind else [bool(m.group(4))]:
                for ga in accums if token == kind else [int(m.group(6) or 1)]:
                    add(kind, kind, ga, ac=ac)
        elif token == "fsdp2" or (m and m.group(1) == "fsdp2"):
            for ac in acs if token == "fsdp2" else [bool(m.group(4))]:
                for ga in accums if token == "fsdp2" else [int(m.group(6) or 1)]:
                    add("fsdp2", "fsdp2", ga, dp=world, ac=ac)
        elif token == "tp" or (m and m.group(2)):
            sizes = (
                tp_sizes(spec, local_world, args.tp_sizes) if token == "tp" else [int(m.group(2))]
            )
            if not sizes:
                notes.append(
                    f"{spec.name}: no tensor-parallel configuration (world {world}, "
                    f"{local_world} per node, --tp-sizes {args.tp_sizes})"
                )
            for t in sizes:
                why = _tp_unfit(spec, local_world, t)
                if why:
                    notes.append(f"{spec.name}: {token} left out: {why}")
                    continue
                for ac in acs if token == "tp" else [bool(m.group(4))]:
                    for ga in accums if token == "tp" else [int(m.group(6) or 1)]:
                        add(f"tp{t}-fsdp2", "tp", ga, tp=t, dp=world // t, ac=ac)
        elif token == "pp":
            if world == 1:
                notes.append(f"{spec.name}: no pipeline on one device")
            for p in args.pp_sizes or ([world] if world > 1 else []):
                for ac in acs:
                    add_pp(p, ac, args.force_pp)
        else:  # ppP-fsdp2[-ac], named: run whatever the others do
            add_pp(int(m.group(3)), bool(m.group(4)), True)
    seen, unique = set(), []
    for s in out + pipes:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique, notes
