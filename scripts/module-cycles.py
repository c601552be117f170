#!/usr/bin/env python3
"""Import cycles among the modules of a crate's src/ tree.

Usage: python3 scripts/module-cycles.py [SRC_DIR ...]   (default: src runtimes/src export/src)

Every `crate::a::b` path and every `super::` path in a file is an edge from that file's module to
the module the path names (the longest prefix that is a module of the tree). A module and its own
descendants are one unit here: a parent declares its children and a child may use the helpers
of its parent (`use super::…`), which is how Rust lays out a module and not a cycle between
parts of the program. Cycles are reported between modules where neither contains the other,
e.g. `vae::ops` → `transformer::ops` → `vae::model` → `vae::ops`. Exits 1 when there is one.
"""
import re
import sys
from pathlib import Path


def module_of(src: Path, f: Path) -> tuple:
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def use_paths(text: str):
    """Every path a file names: `crate::…` / `super::…` in code, and the members of
    `use prefix::{a, b::c}` groups (one level of braces is enough for this tree)."""
    for m in re.finditer(r"\buse\s+((?:crate|super)(?:::\w+)*)::\{([^}]*)\}", text):
        for item in m.group(2).split(","):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self":
                yield m.group(1) + "::" + item
            elif item == "self":
                yield m.group(1)
    for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", text):
        yield m.group(1)


def resolve(path: str, here: tuple, modules: set):
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    else:
        base = here
        rest = parts
        while rest and rest[0] == "super":
            base = base[:-1]
            rest = rest[1:]
    target = base
    for p in rest:
        if target + (p,) in modules:
            target = target + (p,)
        else:
            break
    return target


def related(a: tuple, b: tuple) -> bool:
    return a[: len(b)] == b or b[: len(a)] == a


def cycles(src: Path):
    files = [f for f in src.rglob("*.rs")]
    modules = {module_of(src, f) for f in files}
    edges = {m: set() for m in modules}
    for f in files:
        here = module_of(src, f)
        # `super` in a file that is not mod.rs/lib.rs names the parent; in mod.rs too (the module
        # itself is `here`, its parent is `here[:-1]`).
        for path in use_paths(strip_comments(f.read_text())):
            t = resolve(path, here, modules)
            if t != here and not related(t, here):
                edges[here].add(t)
    # Tarjan's strongly connected components.
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return out, edges


def main():
    dirs = [Path(d) for d in (sys.argv[1:] or ["src", "runtimes/src", "export/src"])]
    bad = False
    for src in dirs:
        comps, edges = cycles(src)
        n_edges = sum(len(e) for e in edges.values())
        if not comps:
            print(f"{src}: no import cycle ({len(edges)} modules, {n_edges} edges between unrelated modules)")
        for comp in comps:
            bad = True
            names = ["::".join(m) or "(root)" for m in comp]
            print(f"{src}: import cycle among {', '.join(names)}")
            for m in comp:
                for t in sorted(edges[m]):
                    if t in comp:
                        print(f"    {'::'.join(m)} → {'::'.join(t)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
