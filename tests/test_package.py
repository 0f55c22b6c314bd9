"""The package's shape: no import cycle inside longmem/, no edit of the module search path, SystemExit only in
main(), and the console_scripts entry points installed by ``pip install -e .``."""
import ast
import os
import subprocess
import sys

import pytest

from longmem.paths import REPO

ENTRY_POINTS = ["longmem-eval-lm", "longmem-eval-icl", "longmem-ablate-memory", "longmem-diagnose-memory",
                "longmem-prepare-pile", "longmem-make-longrange", "longmem-build-shakespeare", "longmem-spm-bpe",
                "longmem-hf-tokens", "longmem-demo", "longmem-launch", "longmem-generate", "longmem-generation-recall",
                "longmem-build-broad-corpus", "longmem-recipe"]


def python_files(*folders):
    for folder in folders:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def module_name(path):
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def import_graph():
    """{module: the longmem modules it imports}, imports inside functions included."""
    modules = {module_name(p): p for p in python_files("longmem")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
        # a package's __init__ runs before its modules anyway: importing a parent package is no arrow
        graph[name] = {m for m in imported if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_the_cycle_finder_finds_a_hand_made_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_inside_longmem():
    graph = import_graph()
    assert "longmem.models.loading" in graph["longmem.released"]  # the graph sees real arrows
    assert cycles(graph) == []


def test_utilities_know_no_model():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("longmem.utils."):
            assert {m for m in imported if m.startswith("longmem.models")} == set(), name


SEARCH_PATH = "sys" + ".path."  # in two parts, so that `git grep` for it finds no line of the repository


def test_no_edit_of_the_module_search_path_in_the_repository():
    edits = []
    for path in python_files("longmem", "tests", "eval_scripts", "preprocess", "train_scripts", "configs"):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Attribute) and ast.unparse(node).startswith(SEARCH_PATH):
                edits.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert edits == []


def test_system_exit_is_raised_only_by_main_functions():
    outside = []
    for path in python_files("longmem"):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "main"]:
            for node in ast.walk(fn):
                if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc):
                    outside.append(f"{os.path.relpath(path, REPO)}:{node.lineno} in {fn.name}()")
    assert outside == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_each_entry_point_is_installed_and_answers_help(name):
    exe = os.path.join(os.path.dirname(sys.executable), name)
    assert os.access(exe, os.X_OK), f"{name} is not installed beside {sys.executable}: pip install -e ."
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: "), proc.stdout[:300]


@pytest.mark.slow
@pytest.mark.parametrize("wrapper, command", [("eval_scripts/eval_longmem_lm.py", "eval_lm"),
                                              ("eval_scripts/eval_longmem_icl.py", "eval_icl"),
                                              ("preprocess/prepare_pile.py", "prepare_pile")])
def test_the_releases_script_paths_run_the_same_commands(wrapper, command, run_cli):
    """``python eval_scripts/eval_longmem_icl.py`` prints the help of ``longmem.commands.eval_icl``."""
    run = lambda *a: run_cli(*a, "--help", timeout=120).stdout
    by_path, by_module = run(os.path.join(REPO, wrapper)), run("-m", f"longmem.commands.{command}")
    after_usage = lambda text: text.split("\n\n", 1)[1]  # noqa: E731  (usage wraps after the program's name)
    assert after_usage(by_path) == after_usage(by_module)
    assert "options:" in by_path


def test_a_commands_main_returns_only_an_exit_status_and_ends_config_errors_in_one_line(capsys):
    """console_scripts run ``sys.exit(main())``: a main that returned its figures (a dict) printed them and exited
    1 after a good run; a ConfigError ends as argparse ends, exit code 2 and one line."""
    from longmem.errors import ConfigError
    from longmem.utils.cli import exit_on_config_error

    assert exit_on_config_error(lambda argv: {"ppl": 3.0}) is None
    assert exit_on_config_error(lambda argv: 3) == 3

    def refuses(argv):
        raise ConfigError(f"--k {argv[1]} is not a multiple of --chunk-size")

    with pytest.raises(SystemExit) as stop:
        exit_on_config_error(refuses, ["--k", "6"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(": error: --k 6 is not a multiple of --chunk-size\n")
