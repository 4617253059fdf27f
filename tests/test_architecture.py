"""The package's layout rules, checked on the source: no import cycle, layers import one way, shipped files stay
self-contained (they are copied into saved folders for `trust_remote_code`)."""

import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "fastinst_hf"
SHIPPED = (
    "configuration_fastinst",
    "configuration_fastinst_resnet_vd",
    "modeling_fastinst",
    "modeling_fastinst_resnet_vd",
    "loss_fastinst",
    "image_processing_fastinst",
    "image_processing_pil_fastinst",
    "mask_resizing_fastinst",
)
# What each layer may import from the package (besides itself). "model" is the shipped files and `__init__`.
ALLOWED_LAYERS = {
    "utils": set(),
    "model": set(),
    "data": {"utils", "model"},
    "evaluation": {"utils", "model", "data"},
    "hub": {"utils", "model"},
    "conversion": {"utils", "model", "hub"},
    "inference": {"utils", "model", "hub", "conversion"},
    "training": {"utils", "model", "data", "evaluation", "hub", "conversion", "inference"},
    "benchmarks": {"utils", "model", "data", "evaluation", "hub", "conversion", "inference", "training"},
    "demo": {"utils", "model", "hub", "inference"},
    "cli": {"utils", "model", "data", "evaluation", "hub", "conversion", "inference", "training", "benchmarks", "demo"},
}
# Absolute imports a shipped file may make: what a user of a transformers model has installed.
SHIPPED_ALLOWED = {"torch", "torchvision", "transformers", "huggingface_hub", "numpy", "PIL"}
# Training-only dependencies: allowed inside a function or a guarded block (`if is_scipy_available():`), never as a
# plain module-level import, so that inference and remote-code loading work without them.
SHIPPED_ALLOWED_IN_FUNCTIONS = {"scipy"}


def module_name(path: Path) -> str:
    parts = ("fastinst_hf",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in module `name`, function-level ones included.

    `from .pkg import x` counts as importing `pkg.x` when that is a module of the package, else `pkg`.
    """
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in MODULES else base, id(node) in top_level))
    return found


def package_imports(name: str) -> set[str]:
    return {target for target, _ in imports_of(name) if target in MODULES and target != name}


def layer(name: str) -> str:
    """The sub-package a module belongs to; the modules of the package root (the shipped files, `releases`) are
    "model"."""
    parts = name.split(".")
    return "model" if len(parts) == 1 or parts[1] in (*SHIPPED, "releases") else parts[1]


def test_the_module_list_covers_every_layer():
    assert {layer(name) for name in MODULES} == set(ALLOWED_LAYERS)
    assert all(f"fastinst_hf.{name}" in MODULES for name in SHIPPED)


def relative_import_targets(name: str) -> list[str]:
    """The module (or package) each relative import of module `name` names, function-level ones included."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            targets.append(".".join(base + ([node.module] if node.module else [])))
    return targets


def test_every_relative_import_names_a_module_of_the_package():
    # A function-level import of a moved module fails only when that function runs.
    missing = [
        f"{name}: {target}" for name in MODULES for target in relative_import_targets(name) if target not in MODULES
    ]
    assert not missing, "\n".join(missing)


def test_no_import_cycle_among_the_package_modules():
    graph = {name: package_imports(name) for name in MODULES}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_layers_import_one_way():
    wrong = [
        f"{name} imports {target}"
        for name in MODULES
        for target in package_imports(name)
        if layer(target) != layer(name) and layer(target) not in ALLOWED_LAYERS[layer(name)]
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("shipped", SHIPPED)
def test_shipped_files_import_only_shipped_siblings_and_allowed_packages(shipped):
    name = f"fastinst_hf.{shipped}"
    problems = []
    for target, at_module_level in imports_of(name):
        top = target.split(".")[0]
        if top == "fastinst_hf":
            if target.split(".", 1)[-1] not in SHIPPED:
                problems.append(f"{target} is not a shipped file")
        elif top in sys.stdlib_module_names or top in SHIPPED_ALLOWED or top == "__future__":
            continue
        elif top in SHIPPED_ALLOWED_IN_FUNCTIONS and not at_module_level:
            continue
        else:
            problems.append(f"{target} ({'module level' if at_module_level else 'in a function'})")
    assert not problems, f"{shipped}.py: " + ", ".join(problems)


def test_the_import_parser_sees_relative_and_function_level_imports():
    imports = dict(imports_of("fastinst_hf.loss_fastinst"))
    assert imports["fastinst_hf.configuration_fastinst"] is True
    assert imports["scipy.optimize"] is False
    cli_targets = package_imports("fastinst_hf.cli.predict")  # the predictor in `run`, the errors at module level
    assert {"fastinst_hf.inference.predictor", "fastinst_hf.utils.errors"} <= cli_targets
