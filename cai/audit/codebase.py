"""The audited codebase: file discovery, parsing, module names, imports and name resolution.

Nothing here imports or executes audited code: everything is read with `ast`.

Discovery honours a default exclude list (`DEFAULT_EXCLUDED_DIRS`, any `*.egg-info`, and a
`fixtures` directory directly under a `tests`/`test` directory). Exclusions apply only *below*
a path the user gave, so `cai audit tests/fixtures/audit/x` audits that fixture.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import BadInputError

DEFAULT_EXCLUDED_DIRS = frozenset(
    {
        ".git", ".hg", ".svn", ".venv", "venv", "env", ".env", "build", "dist", "__pycache__",
        "node_modules", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".eggs",
        "site-packages",
    }
)
TEST_DIR_NAMES = frozenset({"tests", "test", "testing"})
# non-Python files read for references to modules (entry points, shell scripts, CI). Markdown
# is deliberately not read: docs saying a module is used is the failure the rule exists for.
TEXT_SUFFIXES = frozenset({".toml", ".cfg", ".ini", ".sh", ".bash", ".yaml", ".yml", ".json", ".mk", ".txt", ".ipynb"})
TEXT_NAMES = frozenset({"Makefile", "Dockerfile", "Procfile", "justfile", "Justfile"})
MAX_TEXT_BYTES = 1_000_000


def _excluded(dirpath: Path, name: str) -> bool:
    if name in DEFAULT_EXCLUDED_DIRS or name.endswith(".egg-info"):
        return True
    return name == "fixtures" and dirpath.name in TEST_DIR_NAMES


def excluded_by(rel: str, patterns: tuple[str, ...]) -> bool:
    """Whether a root-relative path matches an --exclude glob, itself or through one of its
    directories (`archive`, `archive/**`, `scripts/old_*.py`; `*` also crosses `/`)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pat.rstrip("/")) for pat in patterns for p in prefixes)


def discover(paths: list[str]) -> tuple[Path, list[Path], list[Path]]:
    """(root, python files, other text files) for the given paths; BadInputError when a path is
    missing or no Python file is found. The root is the deepest directory containing them all."""
    if not paths:
        raise BadInputError("no path given")
    py: dict[Path, None] = {}
    text: dict[Path, None] = {}
    dirs: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise BadInputError(f"no such file or directory: {raw}")
        p = p.resolve()
        if p.is_file():
            dirs.append(p.parent)
            if p.suffix == ".py":
                py[p] = None
            continue
        dirs.append(p)
        for dirpath, dirnames, filenames in os.walk(p):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not _excluded(here, d))
            for fn in sorted(filenames):
                f = here / fn
                if fn.endswith(".py"):
                    py[f] = None
                elif f.suffix in TEXT_SUFFIXES or fn in TEXT_NAMES:
                    text[f] = None
    if not py:
        raise BadInputError(f"no Python files in {', '.join(paths)}")
    root = Path(os.path.commonpath([str(d) for d in dirs]))
    return root, list(py), list(text)


def is_test_file(rel: str, tree: ast.Module | None) -> bool:
    """A test module: conftest.py, anything under a tests/ directory, or test_*.py / *_test.py
    that defines test functions or imports pytest/unittest (an evaluation script merely named
    `test_model.py` is not a test)."""
    parts = rel.split("/")
    name = parts[-1]
    if name == "conftest.py" or any(p in TEST_DIR_NAMES for p in parts[:-1]):
        return True
    if not (name.startswith("test_") or name.endswith("_test.py")):
        return False
    if tree is None:
        return True
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.lower().startswith("test"):
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("pytest", "unittest") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pytest", "unittest"):
            return True
    return False


@dataclass(eq=False)
class SourceFile:
    path: Path
    rel: str
    module: str  # dotted name relative to the root ("" for a root __init__.py)
    tree: ast.Module | None = None
    error: tuple[int, int, str] | None = None  # (line, column, message) when it does not parse
    is_init: bool = False
    is_test: bool = False
    # filled by Codebase.index
    imports: dict[str, tuple] = field(default_factory=dict)  # local name -> ("module", d) | ("symbol", d, name)
    funcs: dict[str, ast.AST] = field(default_factory=dict)
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    consts: dict[str, ast.expr] = field(default_factory=dict)
    imported: set[str] = field(default_factory=set)  # absolute dotted names this file imports
    lines: list[str] = field(default_factory=list)  # source lines (suppression comments, fingerprints)

    _nodes: list | None = None
    _names: set | None = None
    _parents: dict | None = None

    def __repr__(self) -> str:
        return f"SourceFile({self.rel!r})"

    @property
    def names(self) -> set[str]:
        """Every identifier used in the file (names, attributes, imported names): a cheap
        pre-filter so rules skip files that cannot match."""
        if self._names is None:
            self._names = set()
            for n in self.nodes:
                if isinstance(n, ast.Name):
                    self._names.add(n.id)
                elif isinstance(n, ast.Attribute):
                    self._names.add(n.attr)
                elif isinstance(n, ast.alias):
                    self._names.update(n.name.split("."))
        return self._names

    @property
    def parents(self) -> dict[int, ast.AST]:
        """id(node) -> its parent node."""
        if self._parents is None:
            self._parents = {}
            for n in self.nodes:
                for child in ast.iter_child_nodes(n):
                    self._parents[id(child)] = n
        return self._parents

    @property
    def nodes(self) -> list[ast.AST]:
        """Every node of the tree (one ast.walk, shared by all rules)."""
        if self._nodes is None:
            self._nodes = list(ast.walk(self.tree)) if self.tree is not None else []
        return self._nodes


def dotted_parts(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"] for Name/Attribute chains; None otherwise."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def parse_source(data: bytes, rel: str) -> tuple[ast.Module | None, tuple[int, int, str] | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(data, filename=rel), None
    except SyntaxError as e:
        return None, (max(1, e.lineno or 1), max(1, e.offset or 1), f"{type(e).__name__}: {e.msg}")
    except (ValueError, RecursionError, MemoryError, OverflowError) as e:  # null bytes, deep nesting
        return None, (1, 1, f"{type(e).__name__}: {e}")


class Codebase:
    """Parsed files plus the import graph and call resolution within the audited code."""

    def __init__(self, paths: list[str], exclude: tuple[str, ...] = ()):
        self.root, py, text = discover(paths)
        if exclude:
            py = [p for p in py if not excluded_by(p.relative_to(self.root).as_posix(), exclude)]
            text = [t for t in text if not excluded_by(t.relative_to(self.root).as_posix(), exclude)]
            if not py:
                raise BadInputError(f"no Python files in {', '.join(paths)} outside --exclude {' '.join(exclude)}")
        self.files: list[SourceFile] = []
        for p in py:
            rel = p.relative_to(self.root).as_posix()
            parts = rel[:-3].split("/")
            is_init = parts[-1] == "__init__"
            if is_init:
                parts = parts[:-1]
            sf = SourceFile(p, rel, ".".join(parts), is_init=is_init)
            try:
                data = p.read_bytes()
            except OSError as e:
                sf.error = (1, 1, f"cannot read: {e.strerror}")
            else:
                sf.tree, sf.error = parse_source(data, rel)
                sf.lines = data.decode("utf-8", errors="replace").splitlines()
            sf.is_test = is_test_file(rel, sf.tree)
            self.files.append(sf)
        self.text_files = [(t.relative_to(self.root).as_posix(), t) for t in text]
        self.modules: dict[str, SourceFile] = {}
        self._by_suffix: dict[str, list[SourceFile]] = {}
        self._packages: set[str] = set()  # dotted runs that prefix some module (namespace packages)
        self._attr_classes: dict[tuple, tuple | None] = {}
        for sf in self.files:
            self.modules.setdefault(sf.module, sf)
        for m, sf in self.modules.items():
            parts = m.split(".") if m else []
            for i in range(1, len(parts)):
                self._by_suffix.setdefault(".".join(parts[i:]), []).append(sf)
            for i in range(len(parts)):
                for j in range(i + 1, len(parts)):
                    self._packages.add(".".join(parts[i:j]))
        for sf in self.parsed:
            self._index(sf)

    @property
    def parsed(self) -> list[SourceFile]:
        return [f for f in self.files if f.tree is not None]

    # ------------------------------------------------------------------ indexing
    def absolutize(self, module: str | None, level: int, importer: SourceFile) -> str:
        if level == 0:
            return module or ""
        pkg = importer.module.split(".") if importer.module else []
        if not importer.is_init:
            pkg = pkg[:-1]
        up = level - 1
        base = pkg[: len(pkg) - up] if up <= len(pkg) else []
        return ".".join(base + ([module] if module else []))

    def _index(self, sf: SourceFile) -> None:
        assert sf.tree is not None
        for node in sf.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sf.funcs[node.name] = node
            elif isinstance(node, ast.ClassDef):
                sf.classes[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                sf.consts[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                sf.consts[node.target.id] = node.value
        for node in sf.nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    sf.imported.add(a.name)
                    if a.asname:
                        sf.imports[a.asname] = ("module", a.name)
                    else:
                        head = a.name.split(".")[0]
                        sf.imports.setdefault(head, ("module", head))
            elif isinstance(node, ast.ImportFrom):
                base = self.absolutize(node.module, node.level, sf)
                if base:
                    sf.imported.add(base)
                for a in node.names:
                    if a.name == "*":
                        continue
                    full = f"{base}.{a.name}" if base else a.name
                    sf.imported.add(full)
                    sf.imports[a.asname or a.name] = ("symbol", base, a.name)

    # ------------------------------------------------------------------ resolution
    def candidates(self, dotted: str) -> list[SourceFile]:
        """Modules of the codebase an import of `dotted` may mean: an exact match, else any module
        whose dotted name ends with it (scripts run from their own directory, src layouts)."""
        if not dotted:
            return []
        if dotted in self.modules:
            return [self.modules[dotted]]
        return list(self._by_suffix.get(dotted, ()))

    def resolve_module(self, dotted: str, importer: SourceFile | None = None) -> SourceFile | None:
        cands = self.candidates(dotted)
        if not cands:
            return None
        if len(cands) == 1 or importer is None:
            return cands[0]
        mine = importer.module.split(".")

        def shared(sf: SourceFile) -> int:
            n = 0
            for a, b in zip(sf.module.split("."), mine):
                if a != b:
                    break
                n += 1
            return n

        return max(cands, key=lambda sf: (shared(sf), -len(sf.module)))

    def _lookup(self, sf: SourceFile, name: str, depth: int) -> tuple | None:
        """A top-level name of module sf: ("func", sf, node, None) | ("class", sf, node) |
        ("module", sf2) | ("ext", qualified) | None."""
        if name in sf.funcs:
            return ("func", sf, sf.funcs[name], None)
        if name in sf.classes:
            return ("class", sf, sf.classes[name])
        if name in sf.imports and depth < 6:
            return self._import_target(sf, sf.imports[name], depth + 1)
        sub = self.modules.get(f"{sf.module}.{name}" if sf.module else name)
        if sub is not None and sf.is_init:
            return ("module", sub)
        return None

    def _import_target(self, sf: SourceFile, imp: tuple, depth: int) -> tuple | None:
        if imp[0] == "module":
            target = self.resolve_module(imp[1], sf)
            if target is not None:
                return ("module", target)
            if imp[1] in self._packages:
                return ("ns", imp[1])  # a namespace package (no __init__.py) of the codebase
            return ("ext", imp[1])
        _, base, name = imp
        sub = self.resolve_module(f"{base}.{name}" if base else name, sf)
        if sub is not None and sub is not sf:
            return ("module", sub)
        mod = self.resolve_module(base, sf) if base else None
        if mod is not None:
            if mod is sf:
                return None
            return self._lookup(mod, name, depth)
        return ("ext", f"{base}.{name}" if base else name)

    def resolve(self, sf: SourceFile, node: ast.AST, cls: ast.ClassDef | None = None) -> tuple | None:
        """What a Name/Attribute expression refers to, from inside `sf` (and method of `cls`):
        ("func", file, FunctionDef, ClassDef|None) | ("class", file, ClassDef) | ("module", file) |
        ("ext", "qualified.name") for names from outside the codebase (bare if not imported) | None."""
        parts = dotted_parts(node)
        if not parts:
            return None
        head, rest = parts[0], parts[1:]
        if head in ("self", "cls") and cls is not None:
            if len(rest) == 1:
                found = self.method(sf, cls, rest[0])
                if found is not None:
                    return found
            elif len(rest) == 2:  # self.loader.load(): a project class instance kept on self
                held = self.attr_class(sf, cls, rest[0])
                if held is not None:
                    return self.method(held[1], held[2], rest[1])
            return None
        target = self._lookup(sf, head, 0)
        if target is None:
            if head in ("self", "cls"):
                return None
            return ("ext", ".".join(parts))
        for i, attr in enumerate(rest):
            kind = target[0]
            if kind == "module":
                nxt = self._lookup(target[1], attr, 0)
                if nxt is None:
                    return None
                target = nxt
            elif kind == "class":
                m = self.method(target[1], target[2], attr)
                if m is None or i != len(rest) - 1:
                    return None
                return m
            elif kind == "ns":
                sub = self.resolve_module(f"{target[1]}.{attr}", sf)
                target = ("module", sub) if sub is not None else ("ns", f"{target[1]}.{attr}")
            elif kind == "ext":
                return ("ext", ".".join([target[1], *rest[i:]]))
            else:
                return None
        return target

    def attr_class(self, sf: SourceFile, cls: ast.ClassDef, attr: str) -> tuple | None:
        """("class", file, ClassDef) when some method of cls sets `self.<attr> = C(...)` for one class C
        of the audited code (a project wrapper held on the instance); None when unknown or ambiguous."""
        key = (id(cls), attr)
        if key not in self._attr_classes:
            found: dict[int, tuple] = {}
            for node in ast.walk(cls):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(dotted_parts(t) == ["self", attr] for t in targets):
                        t = self.resolve(sf, node.value.func)
                        if t is not None and t[0] == "class":
                            found[id(t[2])] = t
            self._attr_classes[key] = next(iter(found.values())) if len(found) == 1 else None
        return self._attr_classes[key]

    def method(self, sf: SourceFile, cls: ast.ClassDef, name: str, depth: int = 0) -> tuple | None:
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return ("func", sf, node, cls)
        if depth > 4:
            return None
        for base in cls.bases:
            b = self.resolve(sf, base)
            if b is not None and b[0] == "class":
                found = self.method(b[1], b[2], name, depth + 1)
                if found is not None:
                    return found
        return None

    def functions(self, sf: SourceFile):
        """Every function in sf (nested ones included) with its directly enclosing class."""
        assert sf.tree is not None

        def walk(body, cls):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node, cls
                    yield from walk(node.body, None)
                elif isinstance(node, ast.ClassDef):
                    yield from walk(node.body, node)
                else:
                    for field_name in ("body", "orelse", "finalbody", "handlers", "cases"):
                        sub = getattr(node, field_name, None)
                        if isinstance(sub, list):
                            inner = []
                            for s in sub:
                                inner.extend(s.body if isinstance(s, (ast.ExceptHandler, ast.match_case)) else [s])
                            yield from walk(inner, cls)

        yield from walk(sf.tree.body, None)
