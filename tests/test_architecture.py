"""The package's structure: ways of running it, the import graph, and the documented extension steps."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
