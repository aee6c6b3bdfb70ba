"""Experiment configuration: frozen dataclasses loaded from YAML with dotted overrides.

A run is described by one :class:`Config`. It is read from a YAML file, then command-line
overrides such as ``train.lr=3e-4`` or ``model.kv.mode=bank`` are applied, and the result is
validated field by field. Unknown keys and wrong types fail with an error that names the dotted
key, before any data is read or any run folder is touched.

The resolved config is written to ``RUN_DIR/config.yaml`` and is all that is needed to rebuild a
run (``fedoap run --resume RUN_DIR``).

A key that was renamed is still read under its earlier name, from a file or an override, with
a note (``federation.byzantine`` is now ``federation.num_byzantine``), and hashes as it did.

The package, one job per module: :mod:`~fedoap.config.keys` (a key's meaning and history: the
digest version that introduced it, its earlier names), :mod:`~fedoap.config.ranges` (numeric
ranges), the sections (:mod:`~fedoap.config.schema` with the root :class:`Config`,
:mod:`~fedoap.config.data_schema`, :mod:`~fedoap.config.federation_schema`),
:mod:`~fedoap.config.loading` (YAML, overrides, the typed build),
:mod:`~fedoap.config.validation` (cross-field rules), :mod:`~fedoap.config.identity` (a run's
digest, versioned) and :mod:`~fedoap.config.reference` (the configuration reference, generated
from the sections).
"""

from fedoap.config.data_schema import (
    SEED_MAX,
    VOLUME_SOURCES,
    AugmentConfig,
    ClientSpec,
    DataConfig,
    SplitConfig,
    VolumeSpec,
)
from fedoap.config.federation_schema import (
    AttackConfig,
    ClientDPConfig,
    FederationConfig,
    PrivacyConfig,
    SafeguardConfig,
    SampleDPConfig,
)
from fedoap.config.identity import (
    DIGEST_VERSION,
    EXECUTION_KEYS,
    config_digest,
    digest_view,
    undeclared_keys,
)
from fedoap.config.keys import key, renamed_keys
from fedoap.config.loading import (
    MAX_YAML_NODES,
    RenamedKeyWarning,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    save_config,
)
from fedoap.config.ranges import (
    Range,
    check_ranges,
    ranged,
)
from fedoap.config.schema import (
    CompileMode,
    Config,
    FinetuneConfig,
    KVConfig,
    ModelConfig,
    PBLConfig,
    TrainConfig,
)
from fedoap.config.tracking_schema import TrackingConfig
from fedoap.config.validation import (
    DEVICE_PATTERN,
    validate,
)
from fedoap.errors import ConfigError

__all__ = [
    "AttackConfig",
    "AugmentConfig",
    "ClientDPConfig",
    "ClientSpec",
    "CompileMode",
    "Config",
    "ConfigError",
    "DEVICE_PATTERN",
    "DIGEST_VERSION",
    "DataConfig",
    "EXECUTION_KEYS",
    "FederationConfig",
    "FinetuneConfig",
    "KVConfig",
    "MAX_YAML_NODES",
    "ModelConfig",
    "PBLConfig",
    "PrivacyConfig",
    "Range",
    "RenamedKeyWarning",
    "SEED_MAX",
    "SafeguardConfig",
    "TrackingConfig",
    "SampleDPConfig",
    "SplitConfig",
    "TrainConfig",
    "VOLUME_SOURCES",
    "VolumeSpec",
    "apply_overrides",
    "check_ranges",
    "config_digest",
    "digest_view",
    "from_dict",
    "key",
    "load_config",
    "load_yaml",
    "parse_override",
    "ranged",
    "renamed_keys",
    "save_config",
    "undeclared_keys",
    "validate",
]
