"""The infra room: what every stage uses, importing no stage.

    errors         `LlmkdError` (a user error: one line, exit 2) and `notice`
    paths          user-given paths checked before use
    locks          one run per artifact folder (`flock`)
    artifacts      artifact folders: atomic writes, `meta.json`, JSON, stage timers
    lineage        which artifacts an artifact was built from, and whether they are still the same
    config_schema  strict YAML, dataclasses from dicts, declared ranges
    config         the nested config dataclasses, `load_config`, `--set` overrides
    reuse          a finished student whose training inputs are unchanged is not trained again
    checkpoints    a distillation run's checkpoints: atomic save, exact restore

The KD losses by name (`llmkd.losses`) are in this room too (a config names one and tries it when it loads),
in their own folder. See docs/architecture.md.
"""
