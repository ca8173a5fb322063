"""Measuring: ``score-bench`` (:mod:`~score_exp.bench.cli`), its measuring side in a worker
process (:mod:`~score_exp.bench.measure`) and its tables (:mod:`~score_exp.bench.report`), the
FLOP counts and MFU (:mod:`~score_exp.bench.flops`), and the GPU check
(:mod:`~score_exp.bench.gpu_check`, ``make gpu-check``)."""
