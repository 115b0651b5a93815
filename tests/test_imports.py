# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The package's import graph: no circle (importing a module of a package
runs the package first, so that counts), no import of the package's own
modules inside a function, and no command reaching into another command's
internals."""
import ast
import os

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(TOP, 'py', 'desitransfer')

#: Modules run as commands (or the package of one); the others are the layer
#: under them, which imports no command.
COMMANDS = {'desitransfer.daemon', 'desitransfer.status', 'desitransfer.daily',
            'desitransfer.nightwatch', 'desitransfer.spacewatch', 'desitransfer.tucson',
            'desitransfer.utah', 'desitransfer.control', 'desitransfer.restore',
            'desitransfer.audit', 'desitransfer.rebuild', 'desitransfer.statistics'}


def modules():
    found = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith('.py'):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace('/', '.')
                if dotted.endswith('.__init__'):
                    dotted = dotted[:-len('.__init__')]
                found[dotted] = path
    return found


def imports(name, path, known):
    """``(module imported, inside a function)`` for each import of `name`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] +
                                ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [base] + [f'{base}.{a.name}' for a in node.names]
        else:
            continue
        for target in targets:
            if target in known:
                out.append((target, id(node) in inside))
                # Importing a module runs the packages above it first.
                parts = target.split('.')
                for i in range(2, len(parts)):
                    parent = '.'.join(parts[:i])
                    if parent in known and not name.startswith(parent + '.') and parent != name:
                        out.append((parent, id(node) in inside))
    return [(t, f) for t, f in out if t != name]


@pytest.fixture(scope='module')
def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def _command(name):
    return next((c for c in COMMANDS if name == c or name.startswith(c + '.')), None)


def test_no_import_circle(graph):
    edges = {name: {t for t, _ in targets} for name, targets in graph.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_no_package_import_inside_a_function(graph):
    inside = sorted((name, t) for name, targets in graph.items() for t, f in targets if f)
    assert inside == []


def test_layer_imports_no_command(graph):
    wrong = sorted((name, t) for name, targets in graph.items() if _command(name) is None
                   for t, _ in targets if _command(t) is not None)
    assert wrong == []


def test_no_command_reaches_into_another(graph):
    """A command may use another command's public entry (the morning report
    runs the audit; ``desi_transfer_status`` dispatches to the tools), never
    a private name or a module inside another command's package."""
    wrong = []
    for name, path in modules().items():
        mine = _command(name)
        if mine is None:
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
                    parts = package.split('.')
                    base = '.'.join(parts[:len(parts) - node.level + 1] +
                                    ([node.module] if node.module else []))
                else:
                    base = node.module or ''
                other = _command(base)
                if other is None or other == mine:
                    continue
                if base != other:
                    wrong.append((name, base))
                wrong += [(name, f'{base}.{a.name}') for a in node.names
                          if a.name.startswith('_')]
    assert sorted(wrong) == []
