"""Every field of a training config and its default: the typed run config's own
(mugv/run/config.py RunConfig, reference-trainer values, docs/reference.md §4.5), as the
ml_collections dict the config files start from and `--config.a.b=value` overrides."""

import ml_collections

from mugv.run.config import RunConfig


def base_config() -> ml_collections.ConfigDict:
    return RunConfig().to_config_dict()
