"""The experiment configuration: the schema (`config.schema`, dataclasses only) and the machinery that
builds it from YAML and command-line overrides (`config.loading`)."""

from cross_model.config.loading import (  # noqa: F401 - the package's interface
    apply_override,
    coerce,
    describe,
    dump_yaml,
    expand_sweeps,
    from_dict,
    load_config,
    parse_override_value,
    parse_overrides,
    resolved_train_config,
    to_dict,
)
from cross_model.config.schema import (  # noqa: F401
    STAGES,
    EvalConfig,
    ExperimentConfig,
    InterlinguaConfig,
    LoggingConfig,
    ModelsConfig,
    PlatformConfig,
    TaskConfig,
    TrainConfig,
)
