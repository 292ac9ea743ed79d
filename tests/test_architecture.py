"""The layout the README's Architecture section describes: three stages over one store layer.

Read from the source with ``ast``: which featcache modules each stage imports, and that no module
outside the store layer writes a workspace path or a store's markers by hand. And the design
document the code cites (docs/design.md) is in the repository with every section cited.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {
    "featcache",
    "featcache.errors",
    "featcache.geometry",
    "featcache.device",
    "featcache.streams",
    "featcache.progress",
    "featcache.provenance",
    "featcache.cli_common",
    "featcache.encoders",
    "featcache.weights",
    "featcache.registration",
    "featcache.spaceranger",
}
STAGE1 = {f"featcache.{p.stem}" for p in (ROOT / "featcache").glob("*.py") if p.stem != "__init__"} - SHARED


def is_module(name: str) -> bool:
    """A module or package of this repository (``featcache.visium``, ``featcache.stores``)."""
    where = ROOT / name.replace(".", "/")
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The modules ``path`` imports: ``from X import Y`` records X, and X.Y too where Y is a module of ours
    (``from featcache import visium`` imports featcache.visium, not just featcache)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_imports_sees_a_module_imported_by_name(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from featcache import visium, errors as e\nfrom featcache.errors import FeatcacheError\n")
    assert imports(source) == {"featcache", "featcache.visium", "featcache.errors"}
    assert not allowed_featcache("featcache.visium") and allowed_featcache("featcache.errors")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_shared_helpers_exist():
    """The sets above name modules that are there (a removed module must leave them)."""
    for name in SHARED - {"featcache"}:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name


def test_only_the_pipeline_package_spans_the_stages():
    """`pipeline/` may import every stage; no stage imports it (the console scripts start there)."""
    for package in ("featcache", "train", "analysis"):
        for path in modules(package):
            assert not {m for m in imports(path) if m.split(".")[0] == "pipeline"}, path.relative_to(ROOT)
    used = set().union(*(imports(path) for path in modules("pipeline")))
    assert {m.split(".")[0] for m in used} >= {"featcache", "train", "analysis"}


def allowed_featcache(module: str) -> bool:
    return module in SHARED or module == "featcache.stores" or module.startswith("featcache.stores.")


@pytest.mark.parametrize("package", ["train", "analysis"])
def test_stages_2_and_3_use_only_the_store_layer_and_shared_helpers(package):
    for path in modules(package):
        for mod in imports(path):
            if mod.startswith("featcache"):
                assert allowed_featcache(mod), f"{path.relative_to(ROOT)} imports {mod}"
            assert mod.split(".")[0] != "pipeline", f"{path.relative_to(ROOT)} imports {mod}"


def test_train_and_analysis_do_not_import_each_other():
    """Stage 3 reads what stage 2 wrote through the store layer, never its code, and stage 2 knows no stage 3."""
    for package, other in (("train", "analysis"), ("analysis", "train")):
        for path in modules(package):
            bad = {m for m in imports(path) if m.split(".")[0] == other}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_space_ranger_names_import_nothing_of_a_stage():
    """featcache/spaceranger.py is shared by the reader, the generator, the store layer and train/ceiling.py."""
    assert {m.split(".")[0] for m in imports(ROOT / "featcache" / "spaceranger.py")} <= {"__future__", "re", "pathlib"}


def test_stage_1_does_not_import_the_later_stages():
    for path in modules("featcache"):
        bad = {m for m in imports(path) if m.split(".")[0] in ("train", "analysis", "pipeline")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_store_layer_imports_no_stage():
    for path in modules("featcache/stores"):
        for mod in imports(path):
            assert not mod.startswith(("train", "analysis", "pipeline")) and mod not in STAGE1, (
                f"{path.relative_to(ROOT)} imports {mod}"
            )


def test_no_import_circle_between_the_command_lines():
    assert not {m for m in imports(ROOT / "train" / "cli.py") if m == "featcache.cli"}
    assert not {m for m in imports(ROOT / "featcache" / "cli.py") if m.startswith("train")}


def test_workspace_paths_and_markers_belong_to_the_store_layer():
    """No string literal naming a workspace folder or a marker outside featcache/stores/."""
    needles = {
        "datasets",
        "features",
        "runs",
        "results",
        "_done",
        "patches.zarr",
        "targets.zarr",
        "dataset.json",
        "config.json",
        "metrics.json",
        "train_state.pt",
        "checkpoint.pt",
    }
    for package in ("featcache", "train", "analysis", "pipeline"):
        for path in modules(package):
            if "stores" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):  # path / "literal"
                    for side in (node.left, node.right):
                        if isinstance(side, ast.Constant) and side.value in needles:
                            pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} builds a store path by hand")


def test_the_design_document_has_every_section_the_code_cites():
    design = ROOT / "docs" / "design.md"
    assert design.is_file(), "docs/design.md is missing"
    sections = set(re.findall(r"^## (\d+)\. ", design.read_text(), re.M))
    cited = set()
    for package in ("featcache", "train", "analysis", "pipeline"):
        for path in modules(package):
            for ref in re.findall(r"docs/design\.md((?:,? ?§\d+)+)", path.read_text()):
                cited.update(re.findall(r"§(\d+)", ref))
    assert cited, "no module cites docs/design.md"
    assert cited <= sections, f"docs/design.md lacks the cited section(s) {sorted(cited - sections)}"


def test_matplotlib_backend_is_not_chosen_at_import():
    for path in modules("analysis"):
        text = path.read_text()
        assert "matplotlib.use(" not in text and "import matplotlib.pyplot" not in text, path


def test_one_module_builds_trained_models():
    """train/model.py alone builds decoders and the encoder + decoder wrapper, and no other torch module wraps the
    two: training, evaluation and `featcache predict` all get their model from it."""
    home, decoders = ROOT / "train" / "model.py", ROOT / "train" / "decoder.py"
    builders = {"build_decoder", "EncoderDecoder"} | {
        node.name for node in ast.walk(ast.parse(decoders.read_text())) if isinstance(node, ast.ClassDef)
    }
    wrappers = []
    for package in ("featcache", "train", "analysis", "pipeline"):
        for path in modules(package):
            where = path.relative_to(ROOT)
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                module = isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Module") for b in node.bases)
                if module:
                    used = {
                        n.attr
                        for n in ast.walk(node)
                        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
                    }
                    if {"encoder", "decoder"} <= used:
                        wrappers.append(f"{where}: {node.name}")
                if path in (home, decoders):
                    continue
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", getattr(node.func, "attr", None))
                    assert name not in builders, f"{where}:{node.lineno} builds a model with {name}: use train.model"
            if path not in (home, decoders):
                assert "train.decoder" not in imports(path), f"{where} imports train.decoder: use train.model"
    assert wrappers == ["train/model.py: EncoderDecoder"], wrappers
