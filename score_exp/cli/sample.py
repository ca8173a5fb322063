"""``score-sample``: print text sampled from a trained language-model run (nanoGPT's sample.py).

The run folder's ``config.yaml`` (written by ``score-train``) rebuilds the data module, hence the
tokeniser, and the model; the weights come from the run's best checkpoint. Samples go to stdout
and logs and statistics (tokens/s, steps per token, acceptance rate) to stderr, so
``score-sample run_dir=... > samples.txt`` keeps only the text.

Decoding keeps a KV cache per (step, stage) by default (``kv_cache=true``); per-token exit
(``depth.halt``, ``depth.adaptive_eps``), the bounded cache (``kv_slots``), ``warm_start`` and
self-speculative decoding (``speculative_steps``) are options (``models/generation.py``,
docs/generation.md).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig

from score_exp.cli.common import bad_input_exits, require
from score_exp.config import CONFIG_DIR
from score_exp.errors import ConfigError, check_int, check_number, check_seed
from score_exp.run import load_run
from score_exp.runs import stop


def load_model(run_dir: Path, checkpoint: str | None = None, device: str = "cpu"):
    """A run's model (in eval mode, on ``device``) and tokeniser, rebuilt from its folder."""
    loaded = load_run(run_dir, checkpoint, "predict", model_overrides={"compile": False})
    datamodule, model = loaded.task.datamodule, loaded.task.model
    if not hasattr(datamodule, "tokenizer"):
        raise ConfigError(
            f"task {loaded.cfg.task.name!r} is not a language-model task; nothing to sample"
        )
    return model.eval().to(device), datamodule.tokenizer


def generate_samples(
    model,
    tokenizer,
    prompt: str,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    decoder=None,
    stats=None,
) -> list[str]:
    """``num_samples`` texts, each ``prompt`` followed by ``max_new_tokens`` sampled tokens.

    ``decoder``: a :class:`~score_exp.models.generation.Decoder` (the KV cache and its options);
    None: nanoGPT's ``generate`` (the whole context each token). ``stats``: a
    :class:`~score_exp.models.generation.Stats` that adds up what the sampling spent.
    """
    import torch

    from score_exp.models.generation import plain_generate

    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("the prompt encodes to no token; give at least one character")
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    out = []
    with torch.no_grad(), amp:
        for _ in range(num_samples):
            if decoder is None:
                y = plain_generate(model, idx, max_new_tokens, temperature, top_k, generator, stats)
            else:
                y = decoder.generate(idx, max_new_tokens, temperature, top_k, generator, stats)
            out.append(tokenizer.decode(y[0].tolist()))
    return out


def make_decoder(model, cfg: DictConfig):
    """The decoding ``cfg`` asks for: a Decoder, or None for ``kv_cache=false``."""
    from score_exp.models.generation import Decoder

    if not cfg.kv_cache:
        asked = [k for k in ("kv_slots", "speculative_steps") if cfg[k] is not None]
        asked += ["warm_start"] if cfg.warm_start else []
        if asked:
            raise ConfigError(f"{', '.join(asked)} decode with the KV cache: drop kv_cache=false")
        return None
    try:
        return Decoder(model, cfg.kv_slots, cfg.warm_start, cfg.speculative_steps, cfg.draft_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def per_token_exit(model, cfg: DictConfig):
    """``depth.halt`` / ``depth.adaptive_eps``: the depth's discretisation while sampling."""
    over = cfg.get("depth") or {}
    halt, eps = over.get("halt"), over.get("adaptive_eps")
    if halt is None and eps is None:
        return nullcontext()
    if halt is not None:
        from score_exp.core.spec import HALTS
        from score_exp.models.mlp import check_halt

        check_halt(halt, getattr(model, "halts", HALTS))
    try:
        return model.depth.discretised(adaptive_eps=eps, halt=halt)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check(cfg: DictConfig) -> None:
    import torch

    check_int("num_samples", cfg.num_samples, 1)
    check_int("max_new_tokens", cfg.max_new_tokens, 0)
    check_number("temperature", cfg.temperature)
    if cfg.top_k is not None:
        check_int("top_k", cfg.top_k, 1)
    check_seed(cfg.seed)
    if not isinstance(cfg.kv_cache, bool) or not isinstance(cfg.warm_start, bool):
        raise ConfigError("kv_cache and warm_start must be true or false")
    for key in ("kv_slots", "speculative_steps"):
        if cfg[key] is not None:
            check_int(key, cfg[key], 1)
    check_int("draft_tokens", cfg.draft_tokens, 1)
    eps = (cfg.get("depth") or {}).get("adaptive_eps")
    if eps is not None:
        check_number("depth.adaptive_eps", eps)
    if cfg.device not in ("cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg.device!r}")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``score-sample``."""
    stop.install(grace=0)  # SIGTERM / SIGINT end it at once, wherever it is
    with bad_input_exits("score-sample"):
        _check(cfg)
        run_dir = require(cfg, "run_dir", "score-sample run_dir=outputs/shakespeare_char_cpu/<run>")
        model, tokenizer = load_model(Path(run_dir).expanduser(), cfg.checkpoint, cfg.device)
        from score_exp.models.generation import Stats

        stats = Stats()
        with per_token_exit(model, cfg):
            decoder = make_decoder(model, cfg)  # its options checked against the model
            samples = generate_samples(
                model,
                tokenizer,
                str(cfg.prompt),
                cfg.num_samples,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.top_k,
                cfg.seed,
                decoder,
                stats,
            )
    for text in samples:
        print(text)
        print(cfg.separator)
    sys.stdout.flush()
    if stats.tokens:
        print(stats.summary(), file=sys.stderr)


if __name__ == "__main__":
    main()
