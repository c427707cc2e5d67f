"""Records which dataset indices each process's DataLoaders fetch (for tests/test_distributed.py).

With this folder first on PYTHONPATH, Python imports this file at start-up in every process, so
the command under test stays exactly the documented one. It does nothing unless
HF_GEMACT_RECORD_SAMPLES names a folder; then each process that fetched anything writes
`fetched_rank<RANK>_<pid>.json` there at exit: one {"dataset_len", "indices"} per fetched batch.
"""

import os

_OUT = os.environ.get("HF_GEMACT_RECORD_SAMPLES")

if _OUT:
    import atexit
    import json

    from torch.utils.data._utils import fetch

    _records = []
    _fetch = fetch._MapDatasetFetcher.fetch

    def _fetch_and_record(self, possibly_batched_index):
        indices = possibly_batched_index if self.auto_collation else [possibly_batched_index]
        _records.append({"dataset_len": len(self.dataset), "indices": [int(i) for i in indices]})
        return _fetch(self, possibly_batched_index)

    def _write():
        if _records:  # the launcher process fetches nothing
            name = f"fetched_rank{os.environ.get('RANK', '0')}_{os.getpid()}.json"
            with open(os.path.join(_OUT, name), "w") as f:
                json.dump(_records, f)

    fetch._MapDatasetFetcher.fetch = _fetch_and_record
    atexit.register(_write)
