"""Run-folder concerns, one module each (a run folder is data, never code).

- :mod:`score_exp.runs.files`: reading a folder's files bounded in size, YAML without resolvers
  and with a limit on aliases, and refusing symbolic links where a run writes.
- :mod:`score_exp.runs.safe_load`: rebuilding a run's config from the project's own config files
  with plain values from the folder; the one allow-list of ``_target_``s (``TRUSTED_ENV``); the
  values an Optuna study may hand to ``score-train``.
- :mod:`score_exp.runs.fingerprint`: the content hashes of a run's input files.
- :mod:`score_exp.runs.checkpoints`: the best checkpoint found relative to the folder when a
  run folder was moved or copied.
"""
