"""The training scripts as a module of the installed package, for any working directory:

    python -m hf_gemact.train clm|mlm|image --output_dir OUT [flags]     (TASK --help lists them)
    accelerate launch -m hf_gemact.train clm --output_dir OUT [flags]

Same flags and behaviour as train_scripts/run_clm.py, run_mlm.py and run_image_classification.py
(which `hf-gemact sweep` does not need: it starts this module).
"""

from __future__ import annotations

import sys

from .training.args import TASKS

USAGE = (f"usage: python -m hf_gemact.train {{{','.join(TASKS)}}} --output_dir OUT [flags]\n"
         "  clm: causal LM (GPT-2 family), mlm: masked LM (BERT family), image: image classification (ViT "
         "family)\n  `python -m hf_gemact.train TASK --help` lists the flags; docs/TRAINING.md explains them.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"error: name a task\n{USAGE}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"error: unknown task {task!r}; expected one of {', '.join(TASKS)}\n{USAGE}", file=sys.stderr)
        return 2
    from .training import main as run_task

    return run_task(task, rest)


if __name__ == "__main__":
    sys.exit(main())
