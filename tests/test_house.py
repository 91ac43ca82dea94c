"""Package hygiene: no import circles, `sparselora --version`, progress bars only on a terminal,
the README's Python examples run as written."""
from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """Module -> sparselora modules it imports (module-level and inside functions alike: a lazy
    import is still a dependency)."""
    mods = {}
    for f in pkg_dir.rglob("*.py"):
        parts = list(f.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph = {}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                b = ".".join(base + ([node.module] if node.module else []))
                names = [b] + [f"{b}.{a.name}" for a in node.names]
            else:
                continue
            # a submodule naming its own package (from . import x) is not a circle through the package
            deps.update(n for n in names if n in mods and n != m and not m.startswith(n + "."))
        graph[m] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")  # lazy: still a circle
    (pkg / "c.py").write_text("from . import a\n")
    assert _cycles(_import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_circles():
    graph = _import_graph(ROOT / "sparselora")
    assert "sparselora.backends.cusparselt_backend" in graph["sparselora.backends.hybrid_backend"]  # the graph is real
    assert _cycles(graph) == []


def test_hybrid_registered_with_the_optional_backends():
    from sparselora.backends import get_backend

    assert get_backend("hybrid").name == "hybrid"


def test_version():
    import sparselora
    from sparselora.cli import main

    r = subprocess.run([sys.executable, "-m", "sparselora", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"sparselora {sparselora.__version__}"
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


@pytest.mark.parametrize("tty,enabled,shown", [(True, True, True), (False, True, False), (True, False, False)])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty, enabled, shown):
    from sparselora.progress import progress_bar

    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress_bar(range(3), desc="work", enabled=enabled)) == [0, 1, 2]
    assert ("work" in stream.getvalue()) == shown


def test_pruning_quiet_when_not_a_terminal(monkeypatch):
    from sparselora.pruning import prune
    from sparselora.tiny_models import build

    model = build("llava")
    for tty in (False, True):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        prune(model, method="magnitude", progress=True)
        assert ("magnitude" in stream.getvalue()) == tty, stream.getvalue()


def test_readme_block_reconstruction_example_runs(tmp_path, monkeypatch):
    """The block-wise (default) restoration example: blocks got nearer to the dense ones, every mask
    exactly as pruned."""
    from sparselora.format import check_nm

    ns = _run_readme_example("block_error_before", tmp_path, monkeypatch)
    model, report = ns["model"], ns["report"]
    assert report["method"] == "blocks" and report["names"]
    assert report["block_error_after"] < report["block_error_before"]
    for name in report["names"]:
        lin = model.get_submodule(name)
        check_nm(lin.weight, name=name)
        assert not lin.weight[~lin.sparse_mask].any(), name


def test_readme_cli_flow_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's step-by-step CLI flow (prune -> restore -> sparsify -> bench) runs as written, in
    order, each command through ``main``; the restored model is exactly 2:4 with the pruned masks."""
    import shlex

    from sparselora.cli import load_model, main

    flows = [b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S) if "sparselora prune    --tiny" in b]
    assert len(flows) == 1, len(flows)
    commands = [shlex.split(line.split("#")[0]) for line in flows[0].splitlines() if line.startswith("sparselora ")]
    assert [c[1] for c in commands] == ["prune", "restore", "sparsify", "bench"]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for argv in commands:
        assert main(argv[1:] + ["-q"]) == 0, argv  # every command of the flow takes -q (no progress bars)
    pruned, _ = load_model("pruned", None)
    restored, info = load_model("restored", None)
    assert info["stage"] == "merged" and info["restore"]["method"] == "blocks"
    for name, lin in pruned.named_modules():
        if hasattr(lin, "sparse_mask"):
            w = restored.get_submodule(name).weight
            assert torch.equal(restored.get_submodule(name).sparse_mask, lin.sparse_mask) and not w[~lin.sparse_mask].any(), name


def _python_blocks(md: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", md, flags=re.S)


def _run_readme_example(marker: str, tmp_path, monkeypatch) -> dict:
    """Run the README's one python block containing ``marker`` in ``tmp_path``; its namespace."""
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {marker!r}"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    return ns


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    """The README's two stand-alone examples (the prune -> SparseLoRA -> sparsify -> save -> load flow,
    and the SparseLinear one) run as written; the Checkpoints snippet continues the first one on a GPU
    (device_map="cuda") and is covered by tests/test_hf_quantizer.py."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    flow = [b for b in blocks if "dense_teacher" in b]
    layer = [b for b in blocks if "SparseLinear.from_linear" in b]
    assert len(flow) == 1 and len(layer) == 1
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    from sparselora.patch import sparse_layers

    ns: dict = {}
    exec(compile(flow[0], "README.md", "exec"), ns)
    model, reloaded, batches = ns["model"], ns["reloaded"], ns["batches"]
    assert ns["report"].rows and sparse_layers(model)
    assert set(sparse_layers(reloaded)) == set(sparse_layers(model))
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, reloaded(**batches[0]).logits)
    ns = {}
    exec(compile(layer[0], "README.md", "exec"), ns)
    assert ns["y"].shape == (8, 4096) and torch.isfinite(ns["y"]).all()


def test_readme_learned_masks_example_runs(tmp_path, monkeypatch):
    """The learned-mask example: the pruned model carries exactly the learned 2:4 masks."""
    from sparselora.format import check_nm

    ns = _run_readme_example("learn_masks(", tmp_path, monkeypatch)
    masks, pruned = ns["learned"]["masks"], ns["pruned"]
    assert masks and set(masks) == set(ns["priors"])
    for name, keep in masks.items():
        lin = pruned.get_submodule(name)
        assert torch.equal(lin.sparse_mask, keep) and not lin.weight[~keep].any(), name
        check_nm(lin.weight, name=name)


def test_readme_masked_restore_example_runs(tmp_path, monkeypatch):
    """The masked-restoration example: the kept weights trained, every mask exactly as pruned."""
    from sparselora.format import check_nm

    ns = _run_readme_example('method="masked"', tmp_path, monkeypatch)
    model, dense, stats = ns["model"], ns["dense"], ns["stats"]
    assert stats["method"] == "masked" and stats["names"]
    for name in stats["names"]:
        lin = model.get_submodule(name)
        check_nm(lin.weight, name=name)
        assert not lin.weight[~lin.sparse_mask].any(), name
    import copy

    from sparselora.pruning import prune

    before = copy.deepcopy(dense)  # the same (deterministic) pruning, without the restore
    prune(before, method="sparsegpt", pattern="2:4", calib=ns["batches"], refit_iters=20)
    for name in stats["names"]:
        assert torch.equal(before.get_submodule(name).sparse_mask, model.get_submodule(name).sparse_mask), name
    assert sum(not torch.equal(model.get_submodule(n).weight, before.get_submodule(n).weight) for n in stats["names"]) > len(stats["names"]) // 2
