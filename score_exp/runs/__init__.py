"""A run's life, one module each (a run folder is data, never code).

- :mod:`score_exp.runs.record`: the folder's file names (:class:`~score_exp.runs.record.RunFolder`)
  and its record (``results.json``, :class:`~score_exp.runs.record.RunRecord`, with a schema
  version), the size limits of what a reader takes from a folder.
- :mod:`score_exp.runs.files`: atomic writes; reading a folder's files bounded in size, YAML
  without resolvers and with a limit on aliases, and refusing symbolic links where a run writes.
- :mod:`score_exp.runs.fingerprint`: a folder's identity (the resolved config minus the one
  list of non-identity keys, plus the content hashes of its input files) and its fingerprint.
- :mod:`score_exp.runs.claim`: binding a folder to a config before any work (skip, resume,
  refuse; ``overwrite=true`` moves the old run aside), decided once for every rank.
- :mod:`score_exp.runs.lock`: one process trains in a folder at a time (``flock``).
- :mod:`score_exp.runs.checkpoints`: checkpoints loaded as data, found relative to the folder,
  and the resume point (an unreadable one is moved aside).
- :mod:`score_exp.runs.cluster`: jobs a scheduler owns (ranks deciding together, requeues,
  whose job it is).
- :mod:`score_exp.runs.sweeps`: job folder names, workers that stop with their sweep, failed
  jobs listed at the end.
- :mod:`score_exp.runs.launch`: the sweep launcher's wrapper (a finished job is skipped before
  it is submitted) and a job's objective value.
- :mod:`score_exp.runs.safe_load`: rebuilding a run's config from the project's own config files
  with plain values from the folder; the one allow-list of ``_target_``s (``TRUSTED_ENV``); the
  values an Optuna study may hand to ``score-train``.
- :mod:`score_exp.runs.study`: a tuning study (Optuna 4): its search space (``tune:``), its
  trials as ``score-train`` runs in ``<study>/trial<N>/``, its budget and resumption.
- :mod:`score_exp.runs.study_db`: a study's database read as data (schema checked read-only,
  the best trial's overrides).

``files`` imports nothing of the package but :mod:`score_exp.errors`, ``record`` only ``files``;
nothing here imports the builder (:mod:`score_exp.run`) or a door (:mod:`score_exp.cli`).
"""
