"""``score-sample``: print text sampled from a trained language-model run (nanoGPT's sample.py).

The run folder's ``config.yaml`` (written by ``score-train``) rebuilds the data module, hence the
tokeniser, and the model; the weights come from the run's best checkpoint. Samples go to stdout
and logs to stderr, so ``score-sample run_dir=... > samples.txt`` keeps only the text.
"""

from __future__ import annotations

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
) -> list[str]:
    """``num_samples`` texts, each ``prompt`` followed by ``max_new_tokens`` sampled tokens."""
    import torch

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
            y = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
            out.append(tokenizer.decode(y[0].tolist()))
    return out


def _check(cfg: DictConfig) -> None:
    import torch

    check_int("num_samples", cfg.num_samples, 1)
    check_int("max_new_tokens", cfg.max_new_tokens, 0)
    check_number("temperature", cfg.temperature)
    if cfg.top_k is not None:
        check_int("top_k", cfg.top_k, 1)
    check_seed(cfg.seed)
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
        samples = generate_samples(
            model,
            tokenizer,
            str(cfg.prompt),
            cfg.num_samples,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.seed,
        )
    for text in samples:
        print(text)
        print(cfg.separator)


if __name__ == "__main__":
    main()
