"""Write docs/api.md, autopar's API reference, from its public names and their docstrings.

    python docs/make_api.py           # rewrite docs/api.md
    python docs/make_api.py --check   # exit 1 (and say so) if docs/api.md is out of date

Every name in `autopar.__all__` gets an entry, whatever `__all__` holds when this runs: the names
of `SECTIONS` in their place, any other at the end (an error or warning with the errors). Beside
them, what users call on the objects those names return (`PipelinedModel`, the optimizer of
`autopar.optimizer`, `DeviceSpec` and `Link` for a cluster of one's own). A class's entry lists
its own public methods and properties: those named in `Entry.members` first, then the rest
alphabetically, so a method added later appears on the next run.

The text is the docstrings', turned into Markdown: a numpydoc heading (a line underlined with
dashes) becomes bold, a paragraph of `name: text` lines (or numpydoc's `name : type` with the
text indented below) a list, an indented block or a `>>>` example a Python code block. The
output depends only on the code, so it is the same on every run and machine
(tests/test_docs_api.py re-generates it and compares).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"
COMMAND = "python docs/make_api.py"
WIDTH = 96  # a signature longer than this is written one parameter a line


@dataclass(frozen=True)
class Entry:
    """One documented object: `name` in `autopar.__all__`, or a dotted path to import."""

    name: str
    members: tuple[str, ...] = ()  # listed first, in this order; the rest follow by name
    constructor: bool = True  # classes: show the signature users construct it with
    fields: bool = False  # dataclasses built by autopar (not by users): list their fields
    attributes: dict[str, str] = field(default_factory=dict)  # instance attributes: text


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    entries: tuple[Entry, ...]


MODEL_MEMBERS = ("train_step", "eval_step", "forward", "clip_grad_norm_")
MODEL_ATTRIBUTES = {"plan": "`Plan`: the plan this model runs (`pm.plan.summary()`, "
                            "`pm.plan.save(path)`)."}

SECTIONS = (
    Section("Plan and run", "Plan offline, compare with a hand configuration, predict, and run "
            "a plan in a `torchrun` job.", (
                Entry("autoparallelize"), Entry("plan"), Entry("manual_plan"),
                Entry("simulate"), Entry("optimizer"))),
    Section("Training state", "Checkpoints through `torch.distributed.checkpoint`, loadable "
            "under any plan.", (
                Entry("save"), Entry("load"), Entry("state_dict"), Entry("load_state_dict"),
                Entry("full_state_dict"))),
    Section("What `autoparallelize` and `optimizer` return", "A `ParallelModel`, or a "
            "`PipelinedModel` for a plan with pipeline stages (or gradient accumulation); "
            "both are `torch.nn.Module`s and are used alike. `autopar.optimizer` returns a "
            "`ShardedOptimizer`.", (
                Entry("ParallelModel", MODEL_MEMBERS, constructor=False,
                      attributes=MODEL_ATTRIBUTES),
                Entry("autopar.runtime.pipeline.PipelinedModel", MODEL_MEMBERS,
                      constructor=False, attributes=MODEL_ATTRIBUTES),
                Entry("autopar.runtime.optim.ShardedOptimizer",
                      ("step", "zero_grad", "state_dict", "load_state_dict"), constructor=False,
                      attributes={"param_groups": "The wrapped optimizer's parameter groups "
                                  "(what LR schedulers change)."}))),
    Section("Plans and predictions", "", (
        Entry("Plan", ("save", "load", "summary", "to_json", "to_dict", "from_dict",
                       "world_size"), constructor=False, fields=True),
        Entry("Report", ("summary",), constructor=False),
        Entry("TrainingPrecision", ("named", "fp32", "mixed_bf16", "name", "dtype")))),
    Section("Clusters", "A cluster is `nodes` nodes of `devices_per_node` identical devices: "
            "a preset, a JSON file, what `torchrun` launched, or built by hand.", (
                Entry("Cluster", ("preset", "from_file", "detect", "world_size")),
                Entry("autopar.cluster.DeviceSpec"), Entry("autopar.cluster.Link"))),
    Section("Studies and extensions", "", (
        Entry("sweep", ("to_csv", "read_csv", "to_dataframe", "to_text", "plot")),
        Entry("register_rule"))),
    Section("Errors and warnings", "Every error autopar raises for a mistake of the user's is "
            "an `AutoparError`; its message says what was wrong, where, and what to do.", (
                Entry("AutoparError"), Entry("ClusterSpecError"), Entry("InfeasibleError"),
                Entry("MeshError"), Entry("PlanMismatchError"), Entry("TraceError"),
                Entry("NoShardingRuleWarning"))),
)
OTHER = "Other public names"
# how the code lines of an entry's methods name an instance of its class (else: lower case)
INSTANCE_NAMES = {"ParallelModel": "pm", "PipelinedModel": "pm", "ShardedOptimizer": "opt",
                  "TrainingPrecision": "precision", "DeviceSpec": "device"}


# -- what to document ---------------------------------------------------------------------------


def resolve(name: str):
    """`autopar.<name>` for a public name, else the object at the dotted path `name`."""
    import autopar

    if "." not in name:
        return getattr(autopar, name)
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def title(name: str) -> str:
    """How an entry is named: `autopar.plan`, or its full path when not in `autopar`."""
    return name if "." in name else f"autopar.{name}"


def layout(public: list[str]) -> list[Section]:
    """SECTIONS with only the public names `public` holds, and the rest of `public` added:
    errors and warnings with the errors, anything else in a last section."""
    placed = {e.name for s in SECTIONS for e in s.entries}
    extra = [n for n in sorted(public) if n not in placed]
    sections = []
    for s in SECTIONS:
        entries = [e for e in s.entries if "." in e.name or e.name in public]
        if s.title == "Errors and warnings":
            entries += [Entry(n) for n in extra if _is_error(resolve(n))]
        if entries:
            sections.append(dataclasses.replace(s, entries=tuple(entries)))
    rest = [Entry(n) for n in extra if not _is_error(resolve(n))]
    if rest:
        sections.append(Section(OTHER, "", tuple(rest)))
    return sections


def _is_error(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def members(obj, entry: Entry) -> list[tuple[str, object]]:
    """(name, member) of what users call on `obj`: `entry.members` in order, then every other
    public method, property, classmethod (and a function's public attributes) by name."""
    own = vars(obj)
    found = {}
    for name, value in own.items():
        if name.startswith("_") or name in entry.members:
            continue
        if isinstance(value, (property, classmethod, staticmethod)) or inspect.isfunction(value):
            found[name] = value
        elif not isinstance(obj, type) and not inspect.ismodule(value):
            found[name] = value  # a function's attribute, such as sweep.to_csv
    listed = []
    for name in entry.members:
        if name not in own:
            raise SystemExit(f"make_api: {title(entry.name)} has no member {name!r}: update "
                             "docs/make_api.py's SECTIONS")
        listed.append((name, own[name]))
    return listed + sorted(found.items())


# -- Markdown -----------------------------------------------------------------------------------


def anchors(lines: list[str]) -> dict[str, str]:
    """Heading line -> the anchor GitHub gives it (a repeated anchor gets -1, -2, ...:
    `autopar.plan` and `autopar.Plan` are both `autoparplan` once lower-cased)."""
    seen: dict[str, int] = {}
    found = {}
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):  # a comment in a code block is no heading
            continue
        text = line.lstrip("#").strip().lower().replace("`", "")
        base = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.setdefault(line, base if n == 0 else f"{base}-{n}")
    return found


_MARKER = re.compile(r"^([-+*>#]|\d+[.)])")  # what would start a list, quote or heading


def wrap(text: str, indent: str = "") -> list[str]:
    """`text` in lines of at most 100 characters (a longer word alone), continuation lines
    indented by `indent`; a word that would start a Markdown list, quote or heading at the
    start of a line stays on the line before."""
    lines: list[str] = []
    line, width = "", 100
    for word in text.split():
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= width or _MARKER.match(word):
            line += " " + word
        else:
            lines.append(line)
            line = word
            width = 100 - len(indent)
    lines.append(line)
    return [lines[0], *(indent + rest for rest in lines[1:])]


def short_path(obj) -> str:
    """`torch.optim.AdamW` rather than `torch.optim.adamw.AdamW`: the shortest module path
    that has the object under its name."""
    module, name = obj.__module__, obj.__qualname__
    if module == "builtins":
        return name
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(prefix), name, None) is obj:
                return f"{prefix}.{name}"
        except ImportError:
            continue
    return f"{module}.{name}"


def _annotation(a) -> str:
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _default(v) -> str:
    if isinstance(v, type) or inspect.isfunction(v):
        return short_path(v)
    text = repr(v)
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # no addresses: the output must not vary


def signature(call: str, obj, *, drop_first: bool = False, returns: bool = True) -> str:
    """`call(a: int, *, b=1) -> T`, one parameter a line when it is long; `call` when the
    object has no signature Python can read."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return call
    params = list(sig.parameters.values())[1 if drop_first else 0:]
    parts, star_done = [], False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _default(p.default)
        parts.append(text)
        nxt = params[i + 1] if i + 1 < len(params) else None
        if p.kind is p.POSITIONAL_ONLY and (nxt is None or nxt.kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = ""
    if returns and sig.return_annotation is not sig.empty:
        ret = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{call}({', '.join(parts)}){ret}"
    if len(one_line) <= WIDTH:
        return one_line
    return f"{call}(\n" + "".join(f"    {p},\n" for p in parts) + f"){ret}"


_RST_ROLE = re.compile(r":\w+:`~?([^`]+)`\s?")  # torch's ":class:`dict`" as "`dict`"
_UNDERLINE = re.compile(r"^\s*[-=]{3,}\s*$")
_TERM = re.compile(r"^(?P<term>[A-Za-z_*][\w*]*(?:, [A-Za-z_*][\w*]*)*): ?(?P<text>.*)$")
_NUMPY_TERM = re.compile(r"^(?P<term>[A-Za-z_][\w]*(?:, [A-Za-z_]\w*)*) : (?P<type>.+)$")


def markdown(doc: str) -> str:
    """A docstring (already dedented) as Markdown; see the module docstring."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            out.append("")
            i += 1
            continue
        if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) and lines[i].strip():
            out += [f"**{lines[i].strip()}**", ""]
            i += 2
            continue
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        block = lines[i:j]
        indented = all(line.startswith(" ") for line in block)
        if indented or block[0].lstrip().startswith(">>>"):
            out += ["```python", *_dedent(block), "```"]
        elif _is_term_list(block):
            out += _term_list(block)
        else:
            out += block
        i = j
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _dedent(block: list[str]) -> list[str]:
    indent = min(len(line) - len(line.lstrip()) for line in block if line.strip())
    return [line[indent:] for line in block]


def _is_term_list(block: list[str]) -> bool:
    """A paragraph of `term: text` (or `term : type`) lines, continued by indented lines, with
    at least one continuation or two terms: a definition list."""
    heads = [line for line in block if not line.startswith(" ")]
    if not heads or block[0].startswith(" "):
        return False
    if not all(_NUMPY_TERM.match(h) or _TERM.match(h) for h in heads):
        return False
    return len(heads) > 1 or len(block) > 1


def _term_list(block: list[str]) -> list[str]:
    items: list[list[str]] = []
    for line in block:
        if line.startswith(" "):
            items[-1].append(line.strip())
        else:
            items.append([line])
    out = []
    for head, *rest in items:
        m = _NUMPY_TERM.match(head)
        if m:
            names = ", ".join(f"`{n}`" for n in m["term"].split(", "))
            first = f"- {names} (*{m['type'].strip()}*)" + (": " if rest else "")
        else:
            m = _TERM.match(head)
            names = ", ".join(f"`{n}`" for n in m["term"].split(", "))
            first = f"- {names}: {m['text']}".rstrip()
        out += wrap(" ".join([first.rstrip(), *rest]) if rest else first, "  ")
    return out


def summary_line(doc: str | None) -> str:
    """The docstring's first sentence, for the index."""
    if not doc:
        return ""
    para = " ".join(_RST_ROLE.sub(r"`\1`", doc).split("\n\n")[0].split())
    cut = re.search(r"\.(\s|$)", para)
    text = para[: cut.start() + 1] if cut else para
    return text.replace("|", "\\|")


# -- rendering ------------------------------------------------------------------------------------


def _doc_of(obj) -> str | None:
    return inspect.getdoc(obj)


def render_member(owner: str, cls: type | None, name: str, value, instance: str) -> list[str]:
    """One method, property or attribute of the class `cls` (or, `cls` None, a function's
    attribute), headed `owner.name`; `instance` names an instance in the code line."""
    if isinstance(value, property):
        ret = value.fget.__annotations__.get("return")
        head, code = f"{owner}.{name}", f"{instance}.{name}" + (
            f" -> {_annotation(ret)}" if ret else "") + "  # property"
        doc = _doc_of(value)
    elif isinstance(value, (classmethod, staticmethod)):
        func = value.__func__
        head = f"{owner}.{name}"
        code = signature(f"{owner}.{name}", func, drop_first=isinstance(value, classmethod))
        doc = _doc_of(func)
    elif inspect.isfunction(value) and instance:
        head = f"{owner}.__call__" if name == "forward" else f"{owner}.{name}"
        call = instance if name == "forward" else f"{instance}.{name}"
        code = signature(call, value, drop_first=True)
        doc = _own_doc(value, cls, name)
    elif callable(value):
        head, code, doc = f"{owner}.{name}", signature(f"{owner}.{name}", value), _doc_of(value)
    else:
        head, code = f"{owner}.{name}", f"{owner}.{name}: {type(value).__name__}"
        doc = _value_doc(value)
    text = markdown(doc or "(no docstring)")
    return [f"#### `{head}`", "", "```python", code, "```", "", text]


def _own_doc(func, cls: type, name: str) -> str | None:
    """The method's own docstring; for one that has none but overrides a documented method of
    a class outside autopar (a torch.optim.Optimizer method), a pointer to that one."""
    if func.__doc__:
        return inspect.getdoc(func)
    for base in cls.__mro__[1:]:
        if name in vars(base) and getattr(vars(base)[name], "__doc__", None):
            first = summary_line(inspect.getdoc(vars(base)[name]))
            return f"As `{short_path(base)}.{name}`: {first}"
    return None


def _value_doc(value) -> str:
    if isinstance(value, dict):
        items = ", ".join(f"`{k}` (*{_default(v)}*)" for k, v in value.items())
        return "\n".join(wrap(f"{len(value)} entries: {items}."))
    return f"`{_default(value)}`"


def render_entry(entry: Entry) -> list[str]:
    obj = resolve(entry.name)
    name = title(entry.name)
    short = entry.name.rpartition(".")[2]
    lines = [f"### `{name}`", ""]
    if isinstance(obj, type):
        bases = [b for b in obj.__bases__ if b is not object]
        own_init = "__init__" in vars(obj)
        if entry.constructor and (own_init or not _is_error(obj)):
            code = "class " + signature(name, obj, returns=False)
        else:
            code = f"class {name}"
        if bases:
            code += "  # " + ", ".join(short_path(b) for b in bases)
        lines += ["```python", code, "```", "", markdown(_doc_of(obj) or "(no docstring)")]
        if entry.fields and dataclasses.is_dataclass(obj):
            fields = ", ".join(f"`{f.name}` (*{_annotation(f.type)}*)"
                               for f in dataclasses.fields(obj))
            lines += [*wrap(f"Fields: {fields}."), ""]
        instance = INSTANCE_NAMES.get(short, short.lower())
        for attr, text in entry.attributes.items():
            lines += [f"#### `{short}.{attr}`", "", *wrap(text), ""]
        for member, value in members(obj, entry):
            lines += render_member(short, obj, member, value, instance)
    else:
        lines += ["```python", signature(name, obj), "```", "",
                  markdown(_doc_of(obj) or "(no docstring)")]
        for member, value in members(obj, entry):
            lines += render_member(short, None, member, value, "")
    return lines


def render() -> str:
    """The whole of docs/api.md."""
    import autopar

    sections = layout(list(autopar.__all__))
    body: list[str] = []
    for s in sections:
        body += [f"## {s.title}", ""]
        if s.intro:
            body += [*wrap(s.intro), ""]
        for e in s.entries:
            body += render_entry(e)
    body = "\n".join(body).splitlines()
    found = anchors(body)
    out = [
        "# API reference",
        "",
        *wrap(f"Generated from the docstrings by `{COMMAND}`; do not edit by hand "
              "(`tests/test_docs_api.py` fails when this file is out of date). Every name in "
              "`autopar.__all__`, and what users call on the objects they return. For a "
              "guided tour see [quickstart.md](quickstart.md); for the command line, "
              "[cli.md](cli.md)."),
        "",
        "| name | what it is |",
        "| --- | --- |",
    ]
    for s in sections:
        for e in s.entries:
            heading = f"`{title(e.name)}`"
            out.append(f"| [{heading}](#{found['### ' + heading]}) | "
                       f"{summary_line(_doc_of(resolve(e.name)))} |")
    text = "\n".join([*out, "", *body])
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if docs/api.md differs from what it would be")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"docs/api.md is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
