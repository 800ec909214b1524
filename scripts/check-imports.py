#!/usr/bin/env python3
"""Checks the import graph of the server crate: no circle between files, and no file that
imports from a layer above its own (the layers are listed in LAYERS, as in its lib.rs).

An edge goes from a file to the file that defines what it imports: `use crate::a::B` where
`a.rs` re-exports `B` from `a/b.rs` is an edge to `a/b.rs`. Module declarations (`mod b;`)
are not imports. Test code (from a `#[cfg(test)]` at the start of a line, and files of modules
declared only there, such as `mod tests;`) is left out.

Usage: scripts/check-imports.py [CRATE_SRC_DIR]   (default: crates/telcoflow-server/src)
Exit status 1 and a list of findings when the graph breaks a rule.
"""

import re
import sys
from pathlib import Path

# Module path prefixes by layer, lowest first; the longest matching prefix decides. Layer 2 is
# what of a call the layers above it hold: the handle (with its inputs), the leg types, and the
# frames legs carry; the actor (`call`, layer 5) and the networks build on them.
LAYERS = [
    ["config", "token", "tls", "audio", "listener", "metrics", "lib"],
    ["call::leg", "call::handle", "call::frames", "call::live", "recording"],
    ["registry", "net"],
    ["state"],
    ["call", "net::sim", "net::sip"],
    ["auth", "control", "media", "http", "drain", "console"],
]
# The crate root wires everything together and may import from any layer.
ROOT = "lib"


def module_files(src: Path) -> dict[str, Path]:
    """Module path ("a::b") -> file, for every module file of the crate."""
    mods = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "mod":
            parts = parts[:-1]
        mods["::".join(parts) if parts != ["lib"] else "lib"] = f
    return mods


def production_modules(mods: dict[str, Path]) -> dict[str, Path]:
    """The modules declared in production code: a file whose `mod` line sits in test code is a
    test file."""
    def declared(m: str) -> bool:
        if m == "lib":
            return True
        parent, _, name = m.rpartition("::")
        parent = parent or "lib"
        decl = rf"^\s*(pub(\([^)]*\))?\s+)?mod\s+{name}\s*;"
        return parent in mods and declared(parent) and re.search(decl, production_text(mods[parent]), re.M)

    return {m: f for m, f in mods.items() if declared(m)}


def production_text(f: Path) -> str:
    text = f.read_text()
    cut = re.search(r"^#\[cfg\(test\)\]", text, re.M)
    text = text[: cut.start()] if cut else text
    # Comments name paths without importing them.
    return re.sub(r"//.*", "", text)


def expand_use(tree: str) -> list[list[str]]:
    """`a::{b, c::{d, e as f}}` -> [[a, b], [a, c, d], [a, c, e]]."""
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix: list[str], s: str):
        if "{" not in s:
            for part in split_top(s):
                if part:
                    part = part.split("as")[0] if re.search(r"\bas\b", part) else part
                    out.append(prefix + [p for p in part.split("::") if p])
            return
        for part in split_top(s):
            if "{" in part:
                head, body = part.split("{", 1)
                walk(prefix + [p for p in head.split("::") if p], body[: body.rindex("}")])
            elif part:
                out.append(prefix + [p for p in part.split("::") if p])

    walk([], tree)
    return out


def split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def own_module(mods: dict[str, Path], f: Path) -> str:
    return next(m for m, p in mods.items() if p == f)


def absolute(path: list[str], here: str) -> list[str] | None:
    """A `use` path made absolute from the crate root, or None for another crate's."""
    if not path:
        return None
    if path[0] == "crate":
        return path[1:]
    base = [] if here == "lib" else here.split("::")
    if path[0] in ("super", "self"):
        while path and path[0] in ("super", "self"):
            if path[0] == "super":
                base = base[:-1]
            path = path[1:]
        return base + path
    return None  # an external crate, std, or a local name


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/telcoflow-server/src")
    mods = production_modules(module_files(src))
    uses: dict[str, list[list[str]]] = {}
    reexports: dict[tuple[str, str], list[str]] = {}
    for m, f in mods.items():
        text = production_text(f)
        paths = []
        for vis, tree in re.findall(r"^\s*(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", text, re.M):
            for p in expand_use(tree):
                a = absolute(p, m)
                if a is None and p and p[0] in mods_children(mods, m):
                    a = (m.split("::") if m != "lib" else []) + p
                if a is None:
                    continue
                paths.append(a)
                if vis and p[-1] != "*":
                    reexports[(m, p[-1] if p[-1] != "self" else p[-2])] = a
        # Inline paths: `crate::a::b::Item` outside `use` lines.
        for p in re.findall(r"\bcrate(?:::\w+)+", re.sub(r"^\s*(pub.*?\s+)?use\s+[^;]+;", "", text, flags=re.M)):
            paths.append(p.split("::")[1:])
        uses[m] = paths

    def resolve(path: list[str], seen=0) -> str | None:
        for n in range(len(path), 0, -1):
            mod = "::".join(path[:n])
            if mod in mods:
                if n < len(path) and (mod, path[n]) in reexports and seen < 8:
                    return resolve(reexports[(mod, path[n])], seen + 1) or mod
                return mod
        return None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, paths in uses.items():
        for p in paths:
            t = resolve(p)
            if t and t != m:
                edges[m].add(t)

    problems = []
    for cycle in cycles(edges):
        problems.append("circle: " + " -> ".join(cycle + [cycle[0]]))
    for m, targets in sorted(edges.items()):
        if m == ROOT:
            continue
        for t in sorted(targets):
            if layer(t) > layer(m):
                problems.append(f"up: {m} (layer {layer(m) + 1}) imports {t} (layer {layer(t) + 1})")
    for m in sorted(mods):
        if layer(m) < 0:
            problems.append(f"no layer: {m} (add it to LAYERS in scripts/check-imports.py)")
    for p in problems:
        print(p)
    if not problems:
        n = sum(len(t) for t in edges.values())
        print(f"{src}: {len(mods)} files, {n} imports between them: no circle, none upwards")
    return 1 if problems else 0


def mods_children(mods, m):
    prefix = "" if m == "lib" else m + "::"
    return {k[len(prefix):].split("::")[0] for k in mods if k.startswith(prefix) and k != m}


def layer(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + "::")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
