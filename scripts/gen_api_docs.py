"""Write docs/API.md: the public API of coars_env and coars_agents, from the code itself.

For every module in ``MODULES``: its public names (``__all__`` where the module defines it,
else the classes and functions defined in it whose names do not start with ``_``), each with
its signature and the first paragraph of its docstring; dataclasses also list their fields
with types and defaults. A test (tests/test_api_docs.py) fails when the committed page is
out of date or a public item has no docstring, so the page never drifts from the code.

    python scripts/gen_api_docs.py            # rewrite docs/API.md
    python scripts/gen_api_docs.py --check    # exit 1 if docs/API.md is stale
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
from pathlib import Path

MODULES = (
    ("coars_env", "Environments: ids, ``make``, data loading"),
    ("coars_env.dialog.config", "Environment configuration"),
    ("coars_env.dialog.env", "The RecDialog ParallelEnv"),
    ("coars_env.vector", "Batched environments"),
    ("coars_env.wrappers", "Single-agent Gymnasium wrappers"),
    ("coars_env.agents", "Scripted agents"),
    ("coars_env.metrics", "Metrics"),
    ("coars_env.logs", "Trajectory logs"),
    ("coars_env.data.prepare", "Data preparation"),
    ("coars_agents.models", "Models"),
    ("coars_agents.policy", "LLM policies"),
    ("coars_agents.constrained", "Constrained decoding"),
    ("coars_agents.rollout", "Rollouts"),
    ("coars_agents.hindsight", "Hindsight references"),
    ("coars_agents.credit", "Credit assignment and losses"),
    ("coars_agents.coars", "The CoARS trainer"),
    ("coars_agents.baselines", "Baselines"),
    ("coars_agents.evaluate", "Evaluation"),
)
OUT = Path(__file__).resolve().parent.parent / "docs" / "API.md"


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == module.__name__
        ]
    return sorted(names, key=str.lower)


def first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def signature(obj) -> str:
    """The signature with annotations as written (no quotes from postponed annotations)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    previous = None
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and previous not in (p.KEYWORD_ONLY, p.VAR_POSITIONAL):
            params.append("*")
        if previous is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY:
            params.append("/")
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        params.append(text)
        previous = p.kind
    out = f"({', '.join(params)})"
    if sig.return_annotation is not sig.empty:
        out += f" -> {_annotation(sig.return_annotation)}"
    return out


def _annotation(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or repr(annotation)


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field), read from the source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(name: str, obj) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"### `{name}`", ""]
        if dataclasses.is_dataclass(obj):
            lines += [first_paragraph(obj), ""]
            lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
            docs = field_docs(obj)
            for f in dataclasses.fields(obj):
                if f.default is not dataclasses.MISSING:
                    default = repr(f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    default = "(factory)"
                else:
                    default = "(required)"
                kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
                meaning = docs.get(f.name, "").replace("|", "\\|")
                kind = kind.replace("|", "\\|")
                lines.append(f"| `{f.name}` | `{kind}` | `{default}` | {meaning} |")
            return lines + [""]
        lines += [f"`{name}{signature(obj)}`", "", first_paragraph(obj), ""]
        methods = [
            (n, m)
            for n, m in vars(obj).items()
            if not n.startswith("_") and (inspect.isfunction(m) or isinstance(m, property))
        ]
        for n, m in methods:
            if isinstance(m, property):
                lines.append(f"- `{n}` (property): {first_paragraph(m)}")
            else:
                lines.append(f"- `{n}{signature(m)}`: {first_paragraph(m)}")
        return lines + [""]
    if callable(obj):
        return [f"### `{name}{signature(obj)}`", "", first_paragraph(obj), ""]
    return [f"### `{name}`", "", f"Constant: `{obj!r}`"[:300], ""]


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the code by `python scripts/gen_api_docs.py` (do not edit by hand;",
        "tests/test_api_docs.py checks it is current). Each entry gives the signature and the",
        "first paragraph of the docstring; the docstrings themselves say more.",
        "",
    ]
    for module_name, title in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`: {title}", "", first_paragraph(module), ""]
        for name in public_names(module):
            lines += describe(name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def missing_docstrings() -> list[str]:
    """Public classes and functions (and their public methods) without a docstring."""
    missing = []
    for module_name, _ in MODULES:
        module = importlib.import_module(module_name)
        if not inspect.getdoc(module):
            missing.append(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not obj.__doc__:
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj) and obj.__module__ == module_name:
                for method_name, method in vars(obj).items():
                    if (
                        not method_name.startswith("_")
                        and inspect.isfunction(method)
                        and not inspect.getdoc(getattr(obj, method_name))  # inherited docs count
                    ):
                        missing.append(f"{module_name}.{name}.{method_name}")
    return missing


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
