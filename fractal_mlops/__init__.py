"""fractal_mlops: FractalNet architecture studies with Optuna and MLflow.

Importing the package is cheap (no torch): the timm model `fractalnet` is registered the
moment timm is imported, or right away when it already is, so that after `import fractal_mlops`
`timm.create_model("fractalnet", blocks=5, columns=3)` works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            importlib.import_module("fractal_mlops.model")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("fractal_mlops.model")
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
