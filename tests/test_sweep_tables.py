"""Sweep tables and run plots on known inputs (the end-to-end sweep is in test_sweep.py)."""

import csv
import json
import math

import pytest

from hf_gemact import sweep
from hf_gemact.plotting import is_png, plot_activations, plot_runs, read_eval_curve


def rows_for(values: dict, metric="loss", speeds=None) -> list:
    rows = []
    for act, finals in values.items():
        for seed, final in enumerate(finals):
            rows.append({"activation": act, "seed": seed, "metric": metric, "final": final, "best": final - 0.1,
                         "throughput": (speeds or {}).get(act, 100.0), "throughput_unit": "tokens/s", "steps": 10,
                         "wall_time_s": 1.0, "output_dir": f"/runs/{act}/seed{seed}"})
    return rows


def test_mean_and_sample_std():
    assert sweep.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert sweep.mean_std([7.0]) == (7.0, 0.0)


def test_summary_ranks_differences_significance_and_speed():
    rows = rows_for({"gelu": [3.0, 3.1, 2.9], "gem_n2": [2.5, 2.52, 2.48], "relu": [3.05, 2.9, 3.2]},
                    speeds={"gelu": 100.0, "gem_n2": 120.0, "relu": 150.0})
    table = {t["activation"]: t for t in sweep.summarize(rows, baseline="gelu")}
    assert [t["activation"] for t in sweep.summarize(rows)] == ["gem_n2", "gelu", "relu"]
    assert table["gem_n2"]["rank"] == 1 and table["relu"]["rank"] == 3
    assert table["gem_n2"]["final_mean"] == pytest.approx(2.5)
    assert table["gem_n2"]["final_std"] == pytest.approx(0.02)
    assert table["gem_n2"]["diff"] == pytest.approx(-0.5)
    assert table["gem_n2"]["significant"] is True  # 0.5 vs SE ~0.06
    assert table["relu"]["significant"] is False  # 0.05 vs SE ~0.1
    assert table["gelu"]["significant"] is None and table["gelu"]["diff"] == 0
    assert table["gem_n2"]["speed_ratio"] == pytest.approx(1.2)
    assert table["gem_n2"]["best_mean"] == pytest.approx(2.4)


def test_accuracy_ranks_higher_first():
    rows = rows_for({"gelu": [0.80, 0.82], "velu": [0.85, 0.86]}, metric="accuracy")
    assert [t["activation"] for t in sweep.summarize(rows)] == ["velu", "gelu"]


def test_tables_have_one_row_per_run_and_per_activation(tmp_path):
    rows = rows_for({"gelu": [3.0, 3.2], "gem_n1": [2.9, 3.1]})
    csv_path, md_path = sweep.write_tables(rows, tmp_path)
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert [(r["activation"], r["seed"]) for r in written] == [("gelu", "0"), ("gelu", "1"), ("gem_n1", "0"),
                                                               ("gem_n1", "1")]
    lines = [line for line in md_path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 3  # header + 2 activations
    assert "| 1 | gem_n1 | 2 | 3.0000 +- 0.1414 |" in md_path.read_text()


def write_log(run_dir, points):
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.jsonl", "w") as f:
        for step, loss in points:
            f.write(json.dumps({"step": step, "split": "train", "loss": loss + 1}) + "\n")
            f.write(json.dumps({"step": step, "split": "eval", "loss": loss}) + "\n")


def test_plots_are_valid_pngs(tmp_path):
    write_log(tmp_path / "gelu" / "seed0", [(10, 3.0), (20, 2.5)])
    write_log(tmp_path / "gelu" / "seed1", [(10, 3.2), (20, 2.7)])
    write_log(tmp_path / "gem" / "seed0", [(10, 2.9), (20, 2.4)])
    assert read_eval_curve(tmp_path / "gelu" / "seed0") == [(10, 3.0), (20, 2.5)]
    out = plot_runs({"gelu": [tmp_path / "gelu" / "seed0", tmp_path / "gelu" / "seed1"],
                     "gem": [tmp_path / "gem" / "seed0"]}, tmp_path / "curves.png")
    assert is_png(out) and out.stat().st_size > 10_000
    out = plot_activations(["gelu", "gem_n1", "segem", "velu"], tmp_path / "acts.png")
    assert is_png(out) and out.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        read_eval_curve(tmp_path / "nowhere")


def test_diverged_runs_are_listed_last_unranked_and_compared_with_nothing(tmp_path):
    nan, inf = float("nan"), float("inf")
    rows = rows_for({"gelu": [3.0, 3.1], "gem_n2": [nan, 2.5], "relu": [inf, inf], "velu": [2.8, 2.9]})
    table = sweep.summarize(rows)
    assert [(t["activation"], t["rank"]) for t in table] == [("velu", 1), ("gelu", 2), ("gem_n2", None),
                                                             ("relu", None)]
    velu, gelu, gem, relu = table
    assert velu["diff"] == pytest.approx((2.8 + 2.9) / 2 - (3.0 + 3.1) / 2)
    assert gem["diverged"] == 1 and gem["final_mean"] == 2.5 and gem["diff"] is None and gem["significant"] is None
    assert relu["diverged"] == 2 and relu["final_mean"] is None and relu["best_mean"] is None
    # a diverged baseline: nothing is compared with it (its mean would be a survivor's)
    assert all(t["diff"] is None for t in sweep.summarize(rows, baseline="gem_n2"))

    _, md_path = sweep.write_tables(rows, tmp_path)
    text = md_path.read_text()
    assert "| diverged | gem_n2 | 2 (1 diverged) | 2.5000 +- 0.0000 |" in text
    assert "| diverged | relu | 2 (2 diverged) | diverged | diverged |  |  |" in text
    assert "| 1 | velu | 2 | 2.8500 +- 0.0707 |" in text


@pytest.mark.parametrize("content, problem", [
    ("", "the file is empty"),
    ('{"task": "clm", "final": {"perpl', "not valid JSON"),
    ('{"task": "clm", "best": {"perplexity": 3.0}}', "no number at final.perplexity"),
    ('{"task": "image", "final": {"accuracy": 0.5}, "best": {"loss": 0.1}}', "no number at best.accuracy"),
    ('{"task": "mlm", "final": {"loss": null}, "best": {"loss": 1.0}}', "no number at final.loss"),
])
def test_unreadable_metrics_name_the_file_and_stay_out_of_the_tables(tmp_path, capsys, content, problem):
    run = sweep.Run("gelu", 0, tmp_path / "gelu" / "seed0")
    run.output_dir.mkdir(parents=True)
    run.metrics_path.write_text(content)
    with pytest.raises(sweep.UnreadableResult, match=f"{run.metrics_path} is unreadable: {problem}"):
        sweep.run_row(run)
    good = sweep.Run("gelu", 1, tmp_path / "gelu" / "seed1")
    good.output_dir.mkdir(parents=True)
    good.metrics_path.write_text(json.dumps({"task": "clm", "final": {"perplexity": 20.0},
                                             "best": {"perplexity": 19.0}, "tokens_per_s": 5.0}))
    rows = sweep._collect_rows([run, good], log=print)
    assert [(r["seed"], r["final"], r["best"], r["throughput_unit"]) for r in rows] == [(1, 20.0, 19.0, "tokens/s")]
    assert f"not in the tables: {run.metrics_path} is unreadable" in capsys.readouterr().out
