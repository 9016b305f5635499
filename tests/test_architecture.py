"""The dependency rules of DESIGN.md, checked on the source and on real Spark workers.

The core imports no engine; engines import no other engine; the engine SDK imports neither side;
executor-side code imports nothing that serves or launches, but for a sharded center's shard
host, which serves the worker's shard from its task (and loads Flask only when it does); no import
cycles.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kerasonspark"
# What a Spark worker must never hold: the driver side, and what serves or launches.
DRIVER_ONLY = (
    "flask",
    "werkzeug",
    "kerasonspark._trainer",
    "kerasonspark._driver",
    "kerasonspark._cluster",
    "kerasonspark._compare",
    "kerasonspark.cli",
    "kerasonspark.testing",
    "kerasonspark.parameter_server._app",
    "kerasonspark.parameter_server._server",
)


# What serving a shard loads in a Spark worker (and only then).
SERVES_A_SHARD = (
    "flask",
    "werkzeug",
    "kerasonspark.parameter_server._app",
    "kerasonspark.parameter_server._server",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or deferred, as absolute names (imports under
    ``if TYPE_CHECKING:`` never run, and do not count)."""
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a package's __init__ naming its own children is not a dependency back on it
            if (
                target
                and target != name
                and not target.startswith(name + ".")
                and not name.startswith(target + ".")
            ):
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(node):
        if node in stack:
            return stack[stack.index(node) :] + [node]
        if node in done:
            return None
        stack.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        stack.pop()
        done.add(node)
        return None

    return next((c for c in (visit(n) for n in sorted(graph)) if c), None)


def test_no_import_cycle_module_level_or_deferred():
    assert find_cycle(package_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


# The one executor-side module that serves: its imports of the server are deferred to the moment a
# sharded center starts.
SHARD_HOST = "kerasonspark.parameter_server._shards"


def test_executor_side_and_sdk_import_nothing_that_serves_or_launches():
    graph = package_graph()
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph[SHARD_HOST] = {m for m in graph[SHARD_HOST] if not m.startswith(DRIVER_ONLY)}
    assert graph[SHARD_HOST] and not _module_level_imports(paths[SHARD_HOST]) & set(DRIVER_ONLY)
    for start in ("kerasonspark._executor", "kerasonspark.engine", "kerasonspark._asynchronous"):
        modules = reachable(start, graph)
        assert not [m for m in modules if m.startswith(DRIVER_ONLY)], start
        outside = {name for m in modules - {SHARD_HOST} for name in imports(paths[m])}
        assert not [name for name in outside if name.startswith(DRIVER_ONLY)], start
    # The SDK and the worker loop never reach it: only an engine's exchange that shards does.
    for start in ("kerasonspark._executor", "kerasonspark.engine"):
        assert SHARD_HOST not in reachable(start, graph), start


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            # the module lives in kerasonspark.parameter_server: one dot is there, two the package
            anchor = {0: "", 1: "kerasonspark.parameter_server.", 2: "kerasonspark."}[node.level]
            names.add(anchor + node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_core_never_imports_an_engine():
    for path in PACKAGE.rglob("*.py"):
        for name in imports(path):
            assert not name.startswith("kerasonspark.backends"), (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_engines_import_only_the_core():
    engines = {p.stem for p in (ROOT / "backends").glob("*.py") if p.stem != "__init__"}
    for path in (ROOT / "backends").glob("*.py"):
        for name in imports(path):
            parts = name.split(".")
            assert not (
                len(parts) > 2 and parts[:2] == ["kerasonspark", "backends"] and parts[2] in engines
            ), f"{path.name} imports another engine: {name}"


@pytest.mark.spark
def test_reused_spark_workers_hold_no_driver_side_module_after_fit_evaluate_and_predict(spark):
    from kerasonspark import SparkTrainer

    from conftest import make_blobs, small_model

    def held(batches):
        # a DataFrame stage, as training runs: Spark keeps the Python workers of DataFrame
        # stages apart from those of RDD jobs
        import sys as worker_sys

        import pyarrow as pa

        for _ in batches:
            pass
        yield pa.RecordBatch.from_arrays([pa.array([sorted(worker_sys.modules)])], names=["names"])

    x, y = make_blobs(200)
    # A sharded center serves from the workers, so it loads the server there, and nothing else.
    for runs, allowed in [
        ([("sync", {"center": "driver"}), ("async", {})], ()),
        ([("sync", {"center": "sharded"})], SERVES_A_SHARD),
    ]:
        for backend, options in runs:
            trainer = SparkTrainer(
                small_model(),
                backend=backend,
                num_workers=2,
                epochs=1,
                batch_size=16,
                spark=spark,
                verbose=0,
                backend_options=options,
            )
            trainer.fit(x, y)
        assert trainer.evaluate(x, y)["accuracy"] > 0.5
        assert len(trainer.predict(x[:8]).collect()) == 8
        trainer.close()
        # More probe tasks than slots, so every idle Python worker of the pool answers; the pool
        # may also hold workers that only ran a pass that trains nothing (the shipping probe).
        per_worker = [
            row.names
            for row in spark.range(8, numPartitions=8)
            .mapInArrow(held, "names array<string>")
            .collect()
        ]
        # the probe reached the workers that trained, so the check below is not vacuous
        assert any("kerasonspark._executor" in names for names in per_worker)
        leaked = {
            name
            for names in per_worker
            for name in names
            if name.startswith(DRIVER_ONLY) and not name.startswith(allowed)
        }
        assert not leaked, f"Spark workers hold driver-side modules: {sorted(leaked)}"


def test_library_code_logs_through_the_kerasonspark_logger_only():
    """Every logger the package logs through is `kerasonspark` or below it (the CLI, an application,
    also sets the levels of others), and nothing prints but the CLI."""
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "backends").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "logging.getLogger" and path.name != "cli.py":
                arg = node.args[0] if node.args else None
                ok = (isinstance(arg, ast.Name) and arg.id == "__name__") or (
                    isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] == "kerasonspark"
                )
                assert ok, f"{path.name}:{node.lineno} creates a logger outside `kerasonspark`"
            if name == "print":
                assert path.name == "cli.py", (
                    f"{path.name}:{node.lineno} prints; log through `kerasonspark` instead"
                )


# What only a classic session has. Elephas is handed an RDD by design: its engine is refused over
# Spark Connect (tests/test_connect.py), so it may use one. (BarrierTaskContext is not among them:
# inside a barrier `mapInArrow` task it is the same on both.)
CLASSIC_ONLY_NAMES = {"sparkContext", "rdd", "_jvm", "_jsc", "broadcast", "parallelize"}
CLASSIC_ONLY_IMPORTS = {"RDD", "SparkContext", "Broadcast"}
CLASSIC_SEAM = {PACKAGE / "_classic.py", ROOT / "backends" / "elephas_adapter.py"}


def test_no_rdd_or_spark_context_outside_the_one_classic_seam():
    """Every other module speaks DataFrames, which a Spark Connect client has too."""
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "backends").rglob("*.py")]):
        if path in CLASSIC_SEAM:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in CLASSIC_ONLY_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyspark"):
                names = {alias.name for alias in node.names} & CLASSIC_ONLY_IMPORTS
                found.extend(f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names)
    assert not found, found
