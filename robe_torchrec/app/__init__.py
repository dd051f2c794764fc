"""The training application (torchtitan style): config, model, data, checkpoints, metrics.

Entry point: ``python -m robe_torchrec.train --config configs/synthetic_small.yaml``.
"""

from robe_torchrec.app.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
