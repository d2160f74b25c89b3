"""The experiment file: its typed sections and the template grid it spans.

    from fractal_mlops.config import load_config, DataConfig
"""

from fractal_mlops.config.experiment import DIMENSIONS, ExperimentConfig, load_config, parse_config
from fractal_mlops.config.sections import DataConfig, SearchConfig, TrainConfig
from fractal_mlops.config.space import Variant, grid

__all__ = ["DIMENSIONS", "DataConfig", "ExperimentConfig", "SearchConfig", "TrainConfig", "Variant",
           "grid", "load_config", "parse_config"]
