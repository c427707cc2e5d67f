"""`hf-gemact tables DIR`: results.md rebuilt from a task folder's raw files (written here by hand),
its numbers checked against statistics computed in the test, and its one-line errors."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from hf_gemact.cli import main
from hf_gemact.plotting import is_png

# activation -> final perplexity per seed; best is 1.0 lower, the throughput (seed + 1) * 100 tokens/s
FINALS = {"gelu": [30.0, 32.0, 31.0], "gem_n2": [27.5, 28.25, 27.0], "velu": [40.0, 45.5, 42.0]}


def write_run(run_dir, metrics: dict, curve: list) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    events = [{"split": "train", "step": 1, "loss": 9.0}] + [{"split": "eval", "step": s, **v} for s, v in curve]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def sweep_folder(root, finals=FINALS):
    rows = []
    for act, values in finals.items():
        for seed, final in enumerate(values):
            metrics = {"task": "clm", "activation": act, "steps": 4, "tokens_per_s": 100.0 * (seed + 1),
                       "final": {"step": 4, "loss": math.log(final), "perplexity": final},
                       "best": {"step": 2, "loss": math.log(final - 1), "perplexity": final - 1}}
            write_run(root / act / f"seed{seed}", metrics, [(2, {"perplexity": final - 1}), (4, {"perplexity": final})])
            rows.append({"activation": act, "seed": seed, "final": final, "best": final - 1})
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["activation", "seed", "final", "best"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def table_rows(text: str) -> dict:
    """The markdown tables' data rows, by name: the second cell of a ranked row, else the first."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("rank", "run"):
            rows[cells[1] if cells[0].isdigit() else cells[0]] = cells
    return rows


def tables(capsys, folder, *extra):
    code = main(["tables", str(folder), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_comes_from_the_runs_metrics_json(tmp_path, capsys):
    folder = sweep_folder(tmp_path / "clm")
    code, out, err = tables(capsys, folder)
    assert code == 0, err
    assert (folder / "results.md").read_text() == out
    assert is_png(folder / "curves.png")
    rows = table_rows(out)
    means = {act: statistics.mean(v) for act, v in FINALS.items()}
    for rank, act in enumerate(sorted(FINALS, key=means.get), start=1):  # perplexity: lower first
        cells = rows[act]
        mean, std = statistics.mean(FINALS[act]), statistics.stdev(FINALS[act])
        se = math.sqrt(std ** 2 / 3 + statistics.stdev(FINALS["gelu"]) ** 2 / 3)
        assert cells[0] == str(rank) and cells[2] == "3"
        assert cells[3] == f"{mean:.4f} +- {std:.4f}"
        assert cells[4] == f"{mean - 1:.4f} +- {std:.4f}"
        assert float(cells[5]) == pytest.approx(mean - means["gelu"], abs=1e-4)
        if act != "gelu":
            assert cells[6] == ("yes" if abs(mean - means["gelu"]) > 2 * se else "no")
        assert cells[7] == "1.00"  # each activation ran at 100, 200 and 300 tokens/s


def test_a_csv_that_disagrees_with_a_runs_metrics_json_is_refused(tmp_path, capsys):
    folder = sweep_folder(tmp_path / "clm")
    path = folder / "gem_n2" / "seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["final"]["perplexity"] = 28.5
    path.write_text(json.dumps(metrics))
    code, out, err = tables(capsys, folder)
    assert code == 2 and out == "" and not (folder / "results.md").exists()
    assert len(err.strip().splitlines()) == 1
    assert f"{folder / 'results.csv'} line 6: final '28.25' but {path} has 28.5" in err


def _remove(path):
    path.unlink()


BROKEN = {  # what is done to a good folder -> the path the error must name
    "no folder": (lambda f: None, lambda f: f / "missing"),
    "no results.csv": (lambda f: _remove(f / "results.csv"), lambda f: f / "results.csv"),
    "results.csv not UTF-8": (lambda f: (f / "results.csv").write_bytes(b"\xff\xfe\x00a"), lambda f: f / "results.csv"),
    "no metrics.json": (lambda f: _remove(f / "velu" / "seed2" / "metrics.json"),
                        lambda f: f / "velu" / "seed2" / "metrics.json"),
    "truncated metrics.json": (lambda f: (f / "gelu" / "seed0" / "metrics.json").write_text('{"task": "cl'),
                               lambda f: f / "gelu" / "seed0" / "metrics.json"),
    "no log.jsonl": (lambda f: _remove(f / "gelu" / "seed1" / "log.jsonl"),
                     lambda f: f / "gelu" / "seed1" / "log.jsonl"),
    "garbled log.jsonl": (lambda f: (f / "gelu" / "seed1" / "log.jsonl").write_text("{not json\n"),
                          lambda f: f / "gelu" / "seed1" / "log.jsonl"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_missing_or_unreadable_raw_data_is_one_line_naming_the_path(tmp_path, capsys, case):
    folder = sweep_folder(tmp_path / "clm")
    damage, named = BROKEN[case]
    damage(folder)
    target = folder / "missing" if case == "no folder" else folder
    code, out, err = tables(capsys, target)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("hf-gemact tables: error: ")
    assert str(named(folder)) in err


def test_a_baseline_without_runs_is_refused(tmp_path, capsys):
    folder = sweep_folder(tmp_path / "clm")
    code, _, err = tables(capsys, folder, "--baseline", "relu")
    assert code == 2 and "--baseline relu" in err and "gelu, gem_n2, velu" in err


# ----------------------------------------------------------------------------- surgery layout

CONTROL, DIRECT = [5.10, 5.14], [5.20, 5.26]  # final validation loss per seed


def surgery_folder(root):
    write_run(root / "base", {"activation": "gelu_new", "steps": 500, "final": {"loss": 5.3, "perplexity": 200.34},
                              "best": {"loss": 5.3}}, [(500, {"loss": 5.3})])
    write_run(root / "gem_no_finetune", {"activation": "gem", "steps": 0, "final": {"loss": 5.6, "perplexity": 270.4},
                                         "best": {"loss": 5.6}}, [(0, {"loss": 5.6})])
    for name, finals in (("control", CONTROL), ("gem_blend0", DIRECT)):
        for seed, final in enumerate(finals):
            metrics = {"task": "clm", "activation": name, "steps": 50, "tokens_per_s": 10.0,
                       "final": {"loss": final, "perplexity": math.exp(final)}, "best": {"loss": final}}
            write_run(root / name / f"seed{seed}", metrics, [(25, {"loss": final + 0.5}), (50, {"loss": final})])
    return root


def test_surgery_tables_compare_the_patched_runs_with_the_control(tmp_path, capsys, monkeypatch):
    from hf_gemact import plotting

    drawn, save = {}, plotting._save

    def keep_lines(plt, fig, out):
        drawn.update({line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()})
        return save(plt, fig, out)

    monkeypatch.setattr(plotting, "_save", keep_lines)
    folder = surgery_folder(tmp_path / "surgery")
    code, out, err = tables(capsys, folder)
    assert code == 0, err
    assert (folder / "results.md").read_text() == out and is_png(folder / "curves.png")
    # the figure: each group's mean curve, and the single runs' levels as horizontal lines
    assert drawn["base (5.3000)"] == [5.3, 5.3] and drawn["gem_no_finetune (5.6000)"] == [5.6, 5.6]
    assert drawn["gem_blend0 (n=2)"] == pytest.approx([statistics.mean(DIRECT) + 0.5, statistics.mean(DIRECT)])
    rows = table_rows(out.split("Steps each group needs")[0])
    assert rows["base"][1:] == ["gelu_new", "500", "5.3000", "200.34"]
    assert rows["gem_no_finetune"][1:] == ["gem", "0", "5.6000", "270.40"]
    direct = rows["gem_blend0"]
    assert direct[3] == f"{statistics.mean(DIRECT):.4f} +- {statistics.stdev(DIRECT):.4f}"
    assert float(direct[5]) == pytest.approx(statistics.mean(DIRECT) - statistics.mean(CONTROL), abs=1e-4)
    assert rows["control"][0] == "1" and direct[0] == "2"
    assert rows["gem_blend0/seed1"][1:] == [f"{DIRECT[1] + 0.5:.4f}", f"{DIRECT[1]:.4f}"]
    with open(folder / "results.csv") as f:
        written = [(r["activation"], r["seed"], float(r["final"])) for r in csv.DictReader(f)]
    assert written == [("base", "", 5.3), ("gem_no_finetune", "", 5.6), ("control", "0", 5.10), ("control", "1", 5.14),
                       ("gem_blend0", "0", 5.20), ("gem_blend0", "1", 5.26)]


def test_surgery_without_its_control_is_refused(tmp_path, capsys):
    folder = surgery_folder(tmp_path / "surgery")
    for seed in (0, 1):
        for name in ("metrics.json", "log.jsonl"):
            (folder / "control" / f"seed{seed}" / name).unlink()
        (folder / "control" / f"seed{seed}").rmdir()
    code, _, err = tables(capsys, folder)
    assert code == 2 and str(folder / "control") in err and len(err.strip().splitlines()) == 1


def test_surgery_tables_give_the_steps_each_group_needs_to_come_within_001_nats_of_the_control(tmp_path, capsys):
    """Group curves written here: 'slow' is within 0.01 of the control's mean only from step 75 on
    (0.012 above it at step 50: not yet), 'never' stays 0.02 above it."""
    folder = tmp_path / "surgery"
    write_run(folder / "base", {"activation": "gelu_new", "steps": 500, "final": {"loss": 5.3}, "best": {"loss": 5.3}},
              [(500, {"loss": 5.3})])
    control = {0: [5.20, 5.10, 5.00, 4.90], 1: [5.22, 5.12, 5.02, 4.92]}  # seed -> loss at steps 25, 50, 75, 100
    offsets = {"slow": [0.30, 0.012, 0.008, 0.0], "never": [0.02, 0.02, 0.02, 0.02]}
    steps = [25, 50, 75, 100]
    groups = {"control": control, **{name: {seed: [c + o for c, o in zip(curve, offs)] for seed, curve in control.items()}
                                     for name, offs in offsets.items()}}
    for name, seeds in groups.items():
        for seed, curve in seeds.items():
            write_run(folder / name / f"seed{seed}", {"task": "clm", "activation": name, "steps": 100,
                                                      "tokens_per_s": 10.0, "final": {"loss": curve[-1]},
                                                      "best": {"loss": min(curve)}},
                      [(s, {"loss": v}) for s, v in zip(steps, curve)])
    code, out, err = tables(capsys, folder)
    assert code == 0, err
    part = out.split("come within 0.01 nats of the control")[1]
    rows = table_rows(part)
    assert rows["slow"][1] == "75" and rows["never"][1] == "not within 100"


def test_a_surgery_folder_shows_its_drift_records_with_the_calibrated_to_plain_ratios(tmp_path, capsys):
    """drift_NAME.json (train_scripts/calibration_drift.py) written here by hand: the table shows each
    number and the calibrated/plain ratios computed here."""
    folder = surgery_folder(tmp_path / "surgery")
    results = [{"activation": "egem_n2", "calibrated": False, "rel_error": 0.4, "kl": 0.2, "loss_before": 5.0,
                "loss_after": 5.5},
               {"activation": "egem_n2", "calibrated": True, "rel_error": 0.1, "kl": 0.01, "loss_before": 5.0,
                "loss_after": 5.05}]
    (folder / "drift_gpt2.json").write_text(json.dumps({"checkpoint": "x/base", "calibration_samples": 8,
                                                        "heldout_samples": 16, "results": results}))
    code, out, err = tables(capsys, folder)
    assert code == 0, err
    part = out.split("Right after surgery, gpt2 (base), 8 calibration texts, 16 held-out texts")[1]
    ratios = part.split("at most half):")[1]
    assert table_rows(ratios)["egem_n2"][1:] == [f"{0.1 / 0.4:.3f}", f"{0.01 / 0.2:.3f}", f"{0.05 / 0.5:.3f}"]
    rows = [line for line in part.splitlines() if line.startswith("| egem_n2 | calibrated")]
    assert rows == ["| egem_n2 | calibrated | 0.1000 | 0.0100 | +0.0500 |"]
    (folder / "drift_gpt2.json").write_text("{")
    code, out, err = tables(capsys, folder)
    assert code == 2 and "drift_gpt2.json: unreadable" in err


def test_a_learning_rate_study_compares_each_activation_at_its_best_learning_rate(tmp_path, capsys):
    """Two sweeps written here: gem_n2 is best at lr 0.01, gelu at lr 0.001 (and velu diverges at
    0.01, so its best is 0.001 whatever it scored there); the last table pairs them so."""
    study = tmp_path / "lr"
    sweep_folder(study / "lr1e-3", {"gelu": [30.0, 31.0], "gem_n2": [35.0, 36.0], "velu": [40.0, 41.0]})
    sweep_folder(study / "lr1e-2", {"gelu": [33.0, 34.0], "gem_n2": [29.0, 29.5], "velu": [float("nan"), 50.0]})
    code, out, err = tables(capsys, study)
    assert code == 0, err
    assert "Learning rate 0.001 (`lr1e-3`)" in out and "Learning rate 0.01 (`lr1e-2`)" in out
    best = table_rows(out.split("Each activation at its best learning rate")[1])
    assert best["gem_n2 (lr 0.01)"][3] == f"{statistics.mean([29.0, 29.5]):.4f} +- {statistics.stdev([29.0, 29.5]):.4f}"
    assert float(best["gem_n2 (lr 0.01)"][5]) == pytest.approx(29.25 - 30.5)
    assert best["gelu (lr 0.001)"][0] == "2" and best["gem_n2 (lr 0.01)"][0] == "1"
    assert "velu (lr 0.001)" in best and not any(k.startswith("velu (lr 0.01") for k in best)
