"""The package's structure: ways of running it, the import graph, and the documented extension steps."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_a_source_checkout_that_is_not_installed_imports_the_recipes(tmp_path):
    """The training scripts' fallback (the repository put on sys.path, hf_gemact not installed):
    hf_gemact.patches comes from the checkout's top-level patches/ and surgery works."""
    checkout = tmp_path / "checkout"
    for name in ("hf_gemact", "patches"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(f"""
        import sys
        # forget this environment's install of hf_gemact (editable: a meta-path finder; regular: site-packages)
        sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "Editable" not in getattr(h, "__name__", "")]
        sys.path_importer_cache.clear()
        sys.path[:] = [p for p in sys.path if "__editable__" not in p]
        sys.path.insert(0, {str(checkout)!r})
        import hf_gemact, hf_gemact.patches
        from transformers import GPT2Config, GPT2LMHeadModel
        assert hf_gemact.__file__.startswith({str(checkout)!r}), hf_gemact.__file__
        assert hf_gemact.patches.__file__ == {str(checkout / "patches" / "__init__.py")!r}, hf_gemact.patches.__file__
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
        print(hf_gemact.patch_activations(model, "gem").family, model.config.activation_function)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["gpt2", "gem"]


# ----------------------------------------------------------------------------- no import circles


def _package_modules(repo: Path) -> dict:
    """module name -> (file, is a package) for hf_gemact and its recipes (patches/, shipped as
    hf_gemact.patches)."""
    found = {}
    for root, prefix in ((repo / "hf_gemact", "hf_gemact"), (repo / "patches", "hf_gemact.patches")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> set:
    """The package modules that `name` imports anywhere in its file (inside functions too: a lazy
    import closes a circle as surely when it runs). `from . import x` of a submodule x imports x,
    not the package again; `import a.b.c` and `from a.b import c` import the deepest module there is."""
    import ast

    package = name if is_package else name.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            named.update(submodules)
            if len(submodules) < len(node.names):
                named.add(source)
    found = set()
    for target in named:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_circles(repo: Path) -> list:
    """Every circle of the package's import graph, each as [a, b, ..., a]."""
    modules = _package_modules(repo)
    graph = {name: _imports(name, *modules[name], modules) for name in modules}
    state, path, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return circles


def test_the_package_has_no_import_circle():
    assert import_circles(REPO) == []


def test_the_circle_check_finds_a_circle(tmp_path):
    """The check itself: a copy of the package with one lazy import added that closes a circle
    (the registry asking surgery, which imports the registry)."""
    for name in ("hf_gemact", "patches"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    registry = tmp_path / "hf_gemact" / "registry.py"
    registry.write_text(registry.read_text() + "\n\ndef _circle():\n    from .surgery import find_sites\n")
    circles = import_circles(tmp_path)
    assert circles and all(c[0] == c[-1] for c in circles)
    assert any("hf_gemact.registry" in c and any(m.startswith("hf_gemact.surgery") for m in c) for c in circles)


def test_no_source_file_is_longer_than_the_limit():
    """Files a reader can hold in mind (issue 15: about 450 lines at most)."""
    long = {str(p.relative_to(REPO)): n for p in [*REPO.glob("hf_gemact/**/*.py"), *REPO.glob("patches/*.py")]
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 460}
    assert long == {}


# ----------------------------------------------------------------- the documented extension steps


def test_adding_an_activation_as_documented(monkeypatch, tmp_path):
    """docs/ARCHITECTURE.md, "Adding an activation", steps 3 and 4 with a test-only family: a module
    class and a FAMILIES entry are all that names, ACT2FN, surgery and a reload need."""
    import torch
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import ACT2FN

    import hf_gemact
    from hf_gemact import registry

    class Toy(nn.Module):  # step 3
        def __init__(self, k: float = 1.0):
            super().__init__()
            if not k > 0:
                raise ValueError(f"k must be > 0, got {k!r}")
            self.k = float(k)

        def forward(self, x):
            return x * torch.sigmoid(self.k * x)

    monkeypatch.setitem(registry.FAMILIES, "toy", registry.Family(  # step 4
        Toy, keys={"k": ("k", float)}, defaults={"k": 1.0}, doc="Toy: x*sigmoid(k*x)"))

    assert hf_gemact.parse_activation("toy_k2").kwargs == {"k": 2.0} and "toy_k2" in ACT2FN
    assert hf_gemact.format_activation(hf_gemact.parse_activation("toy_k1")) == "toy"
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(ACT2FN["toy_k2"](x), x / (1 + torch.exp(-2 * x)))
    with pytest.raises(ValueError, match="k must be > 0"):
        hf_gemact.parse_activation("toy_k-1")

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    report = hf_gemact.patch_activations(model, "toy_k2", layers="-1:")
    assert [(c.block, c.new) for c in report] == [(1, "toy_k2")]
    ids = torch.arange(12).view(2, 6)
    before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert type(loaded.transformer.h[1].mlp.act) is Toy and loaded.transformer.h[1].mlp.act.k == 2.0
    assert type(loaded.transformer.h[0].mlp.act) is not Toy
    assert torch.equal(loaded(input_ids=ids).logits, before)


def test_adding_a_model_family_as_documented(monkeypatch, tmp_path):
    """docs/ARCHITECTURE.md, "Adding a model family", steps 1 and 2 with a test-only family whose
    blocks hold a second activation (a gate) beside the MLP's: the generic recipe would patch both,
    the family's recipe only the MLP, and the patched checkpoint reloads bit-identically."""
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.activations import ACT2FN

    import hf_gemact
    from hf_gemact import patches
    from hf_gemact.patches import Recipe, parent_class_ends_with

    class ToyConfig(PretrainedConfig):
        model_type = "toyfam"

        def __init__(self, width=8, blocks=3, act="gelu", **kwargs):
            self.width, self.blocks, self.act = width, blocks, act
            super().__init__(**kwargs)

    class ToyFeedForward(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(config.width, 16), ACT2FN[config.act], nn.Linear(16, config.width)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    class ToyGate(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.proj, self.act = nn.Linear(config.width, config.width), ACT2FN[config.act]

        def forward(self, x):
            return x * self.act(self.proj(x))

    class ToyBlock(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gate, self.ffn = ToyGate(config), ToyFeedForward(config)

        def forward(self, x):
            return x + self.ffn(self.gate(x))

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.layers = nn.ModuleList(ToyBlock(config) for _ in range(config.blocks))
            self.post_init()

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return x

    def mlp_sites(model):
        return [s.path for s in hf_gemact.surgery.find_sites(model) if s.role == "mlp"]

    torch.manual_seed(0)
    model = ToyModel(ToyConfig()).eval()
    assert len(mlp_sites(model)) == 6  # without the recipe: gates and feed-forwards alike

    recipe = Recipe("toyfam", is_mlp=parent_class_ends_with("FeedForward"), config_attrs=("act",))  # step 1
    monkeypatch.setitem(patches.MODEL_TYPE_TO_RECIPE, "toyfam", recipe)  # step 2

    assert mlp_sites(model) == [f"layers.{i}.ffn.act" for i in range(3)]
    x = torch.randn(4, 8)
    report = hf_gemact.patch_activations(model, "gem")
    assert report.family == "toyfam" and [c.path for c in report] == mlp_sites(model)
    assert model.config.act == "gem"  # the family's attribute, and the gates recorded as what they are
    assert model.config.hf_gemact_activations == {f"layers.{i}.gate.act": "gelu" for i in range(3)}
    patched = model(x)
    model.save_pretrained(tmp_path)
    loaded = ToyModel.from_pretrained(tmp_path).eval()
    assert [type(b.ffn.act).__name__ for b in loaded.layers] == ["GEM"] * 3
    assert [type(b.gate.act).__name__ for b in loaded.layers] == [type(ACT2FN["gelu"]).__name__] * 3
    assert torch.equal(loaded(x), patched)


def test_every_subpackage_is_shipped():
    """pyproject's explicit package list names every folder of hf_gemact that holds modules (a
    regular install leaves an unlisted one out)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in REPO.glob("hf_gemact/**/__init__.py")}
    assert folders | {"hf_gemact.patches"} == listed
