"""fractal_mlops: FractalNet architecture studies with Optuna and MLflow.

Importing the package is cheap (no torch). As with timm's own models, importing the model's
module registers it: after `import fractal_mlops.engine.model`,
`timm.create_model("fractalnet", blocks=5, columns=3)` works.

Models logged by 0.1 (MLflow's "pickle" format) name their classes by the flat module paths
of that version (`fractal_mlops.model.FractalNet`); those names still import, as the modules
that hold the classes now.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

MOVED_MODULES = {
    "fractal_mlops.model": "fractal_mlops.engine.model",
    "fractal_mlops.static_drop_path": "fractal_mlops.engine.static_drop_path",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import fractal_mlops.model` gives `fractal_mlops.engine.model` itself (one module, so
    its classes are the same objects and unpickle as such)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
