"""The recipes ship as `hf_gemact.patches` but live in the repository's top-level patches/ (the
design card's layout). A regular or editable install maps them there; a source checkout that is run
without installing (the training scripts' fallback puts the repository on sys.path) does not, so
`map_recipes` maps them the same way."""

from __future__ import annotations

import importlib.util
import os
import sys

PACKAGE = "hf_gemact"


def map_recipes() -> None:
    name = PACKAGE + ".patches"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return  # the import of hf_gemact.patches then fails, naming it
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[PACKAGE], "patches", module)  # as the import system does for a submodule
