"""fractal_mlops: FractalNet architecture studies with Optuna and MLflow.

Importing the package is cheap (no torch). As with timm's own models, importing the model's
module registers it: after `import fractal_mlops.model`,
`timm.create_model("fractalnet", blocks=5, columns=3)` works.
"""

__version__ = "0.1.0"
