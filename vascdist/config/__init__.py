"""The one typed config tree of vascdist: the schema (`schema.py`) and how it is loaded (`loader.py`)."""

from vascdist.config.batch import BatchSizes, batch_sizes, eval_batch_per_rank
from vascdist.config.loader import (CONFIG_DIR, DEFAULT_CONFIG, config_from_dict, config_names, from_dict,
                                    load_config, parse_overrides, read_yaml, resolve_config_path, save_config,
                                    to_dict)
from vascdist.config.schema import (AudioConfig, Config, CycleConfig, DataConfig, DistConfig, EvalConfig, LossConfig,
                                    ModelConfig, OptimConfig, PreprocessConfig, RunConfig, SchedConfig,
                                    SpectrogramConfig, SplitConfig, TrainConfig)
