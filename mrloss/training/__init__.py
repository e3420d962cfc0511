"""Training runs from a YAML config: ``config`` (schema), ``build`` (tokenizer, model, data files), ``run``
(`mrloss train`), ``evaluate`` (per-region losses) and ``demo`` (`mrloss demo`)."""
