"""How much a patch moves a pretrained checkpoint right after surgery, plain against calibrated.

    python train_scripts/calibration_drift.py CHECKPOINT --calibrate FILE --heldout FILE --out drift.json \
        [--activations egem_n2 segem_n2 gem velu] [--calibration_samples 128] [--heldout_samples 256]

For each activation the checkpoint is patched twice, plainly and with `calibrate=` batches of the
first --calibration_samples texts of --calibrate, and `hf_gemact.activation_drift` compares each
with the unpatched checkpoint on held-out texts (--heldout, which calibration never sees): relative
error of the last hidden state, and for language models the next-token KL and the loss before and
after. A text is --lines_per_sample consecutive non-empty lines of the file. The JSON written to
--out holds every number (and the fitted name of every site); the table printed is made from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hf_gemact
from hf_gemact.tables import drift_table

BATCH_SIZE = 16


def texts(path: Path, lines_per_sample: int, limit: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    grouped = [" ".join(lines[i:i + lines_per_sample]) for i in range(0, len(lines), lines_per_sample)]
    if len(grouped) < limit:
        sys.exit(f"{path}: {len(grouped)} texts of {lines_per_sample} lines, fewer than the {limit} asked for")
    return grouped[:limit]


def batches(tokenizer, items: list[str], max_length: int) -> list[dict]:
    return [dict(tokenizer(items[i:i + BATCH_SIZE], return_tensors="pt", padding=True, truncation=True,
                           max_length=max_length)) for i in range(0, len(items), BATCH_SIZE)]


def load(checkpoint: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint)
    causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in (config.architectures or []))
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def drift_over(reference, patched, held_out: list[dict]) -> dict:
    """activation_drift per held-out batch, combined with each batch's weight (its real tokens)."""
    weights, reports = [], []
    for batch in held_out:
        weights.append(float(batch["attention_mask"].sum()))
        reports.append(hf_gemact.activation_drift(reference, patched, batch))
    total = sum(weights)

    def mean(field):
        values = [getattr(r, field) for r in reports]
        return None if values[0] is None else sum(w * v for w, v in zip(weights, values)) / total

    return {"rel_error": mean("rel_error"), "kl": mean("kl"), "loss_before": mean("loss_before"),
            "loss_after": mean("loss_after")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--calibrate", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--activations", nargs="+", default=["egem_n2", "segem_n2", "gem", "velu"])
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--heldout_samples", type=int, default=256)
    p.add_argument("--lines_per_sample", type=int, default=4)
    p.add_argument("--max_length", type=int, default=128)
    args = p.parse_args(argv)

    reference, tokenizer = load(args.checkpoint)
    calibration = batches(tokenizer, texts(args.calibrate, args.lines_per_sample, args.calibration_samples),
                          args.max_length)
    held_out = batches(tokenizer, texts(args.heldout, args.lines_per_sample, args.heldout_samples), args.max_length)
    results = []
    for act in args.activations:
        for calibrated in (False, True):
            model, _ = load(args.checkpoint)
            start = time.perf_counter()
            report = hf_gemact.patch_activations(model, act, calibrate=calibration if calibrated else None)
            seconds = time.perf_counter() - start
            results.append({"activation": act, "calibrated": calibrated, "patch_seconds": seconds,
                            "sites": {c.path: c.new for c in report.changes},
                            "calibration": {c.path: vars(c.calibration) for c in report.changes if c.calibration},
                            **drift_over(reference, model, held_out)})
            print(f"{act} {'calibrated' if calibrated else 'plain'}: {results[-1]['rel_error']:.4g}", file=sys.stderr)
    record = {"checkpoint": args.checkpoint, "calibrate": str(args.calibrate), "heldout": str(args.heldout),
              "calibration_samples": args.calibration_samples, "heldout_samples": args.heldout_samples,
              "lines_per_sample": args.lines_per_sample, "max_length": args.max_length,
              "torch": torch.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    sys.stdout.write(drift_table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
