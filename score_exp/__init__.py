"""score_exp: experiments with recurrent, contractive depth (SCORE) and its baselines."""

__version__ = "0.1.0"
