"""Run-folder concerns, one module each (a run folder is data, never code).

The folder's file names and its record (``results.json``) belong to :mod:`score_exp.record`.

- :mod:`score_exp.runs.fingerprint`: a folder's identity (the resolved config minus the one
  list of non-identity keys, plus the content hashes of its input files) and its fingerprint.
- :mod:`score_exp.runs.claim`: binding a folder to a config before any work (skip, resume,
  refuse; ``overwrite=true`` moves the old run aside), decided once for every rank.
- :mod:`score_exp.runs.lock`: one process trains in a folder at a time (``flock``).
- :mod:`score_exp.runs.checkpoints`: checkpoints loaded as data, found relative to the folder,
  and the resume point (an unreadable one is moved aside).
- :mod:`score_exp.runs.sweeps`: job folder names, workers that stop with their sweep, failed
  jobs listed at the end.
- :mod:`score_exp.runs.files`: reading a folder's files bounded in size, YAML without resolvers
  and with a limit on aliases, and refusing symbolic links where a run writes.
- :mod:`score_exp.runs.safe_load`: rebuilding a run's config from the project's own config files
  with plain values from the folder; the one allow-list of ``_target_``s (``TRUSTED_ENV``); the
  values an Optuna study may hand to ``score-train``.
"""
