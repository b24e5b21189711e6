"""The three layers: ``import lutnn`` loads the library only, imports point one way, one ``lutnn`` command."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lutnn
from lutnn.cli import SUBCOMMANDS, main

PKG = Path(lutnn.__file__).parent
LIBRARY = [p for p in PKG.rglob("*.py")
           if not p.relative_to(PKG).parts[0] in ("pipeline", "tools", "tvm", "cli.py", "__main__.py")]


def _lutnn_imports(path: Path) -> set[str]:
    """Absolute ``lutnn.*`` modules a file imports (relative imports resolved against its package)."""
    package = ["lutnn", *path.relative_to(PKG).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("lutnn"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lutnn")}
    return out


def test_import_lutnn_loads_no_pipeline_tools_or_tvm():
    code = ("import sys, lutnn; print(sorted(m for m in sys.modules if m.startswith(('lutnn.pipeline', "
            "'lutnn.tools', 'lutnn.tvm', 'tvm', 'sklearn', 'matplotlib', 'tensorboard', 'yaml'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_reexports_resolve_to_the_pipeline_and_tools():
    from lutnn.pipeline.resolve import load_config
    from lutnn.pipeline.runs import load_run
    from lutnn.tools.profile import profile_pair

    assert lutnn.load_run is load_run and lutnn.load_config is load_config and lutnn.profile_pair is profile_pair
    with pytest.raises(AttributeError, match="no_such_name"):
        lutnn.no_such_name


def test_library_never_imports_pipeline_or_tools():
    assert LIBRARY and any(p.name == "convert.py" for p in LIBRARY)
    for path in LIBRARY + list((PKG / "tvm").glob("*.py")):
        bad = {m for m in _lutnn_imports(path) if m.startswith(("lutnn.pipeline", "lutnn.tools"))}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_pipeline_never_imports_tools():
    for path in (PKG / "pipeline").rglob("*.py"):
        bad = {m for m in _lutnn_imports(path) if m.startswith("lutnn.tools")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_config_schema_does_not_import_the_registries():
    """The schema checks types and values; dataset/model registries check themselves (no import circle)."""
    imports = _lutnn_imports(PKG / "pipeline" / "config.py")
    assert not imports & {"lutnn.pipeline.data", "lutnn.pipeline.models", "lutnn.pipeline.resolve"}


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lutnn {name}") and "--help" in out


def test_lutnn_command_lists_subcommands_and_rejects_unknown(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in SUBCOMMANDS)
    assert main(["no-such"]) == 2
    assert "unknown subcommand 'no-such'" in capsys.readouterr().err


def test_readme_layout_section_matches_the_tree():
    readme = (PKG.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    packages = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    assert all(f"{name}/" in block for name in packages), packages
    for layer in ("pipeline", "tools"):
        for module in (PKG / layer).glob("*.py"):
            assert module.stem == "__init__" or module.stem in block, f"README layout misses lutnn/{layer}/{module.name}"
    for script in PKG.parent.glob("*.py"):
        assert script.name in block, f"README layout misses {script.name}"
    for path in ("lutnn/pipeline/", "lutnn/tvm/", "lutnn/tools/", "docs/", "configs/", "scripts/setup.sh"):
        assert (PKG.parent / path).exists(), path
