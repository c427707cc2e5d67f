"""`evaluate` metric modules shipped inside hf_gemact (the hub is unreachable offline).

`load("mean_loss")` / `load("accuracy")` call `evaluate.load` on the module's folder here.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no metric module {name!r} in {METRICS_DIR}; known: {', '.join(known)}")
    return str(path)


def load(name: str, **kwargs):
    import evaluate

    kwargs.setdefault("keep_in_memory", True)  # no cache files shared between processes
    return evaluate.load(metric_path(name), **kwargs)
