"""The doors: ``score-train``, ``score-eval``, ``score-sample``, ``score-tune``.

Each door is thin (parse, check bad input in one line, call the builder :mod:`score_exp.run` or
the run lifecycle :mod:`score_exp.runs`) and never imports another door; what they share (the
one-line refusals, the output-folder checks) is :mod:`score_exp.cli.common`.
"""
