"""`kdship train STORE --student DIR --out RUN_DIR`: a thin typer wrapper of ``kdship.train.trainer.train``."""

from __future__ import annotations

from typing import Optional

import typer

from kdship.config import with_default
from kdship.train.trainer import DEFAULT_OUT, DEFAULTS


def train_command(
    store: str = typer.Argument(..., help="The teacher store written by `kdship cache` (path or fsspec URL)."),
    student: Optional[str] = typer.Option(None, "--student", help="HF model directory to start from (its tokenizer must be the teacher's)."),
    out: Optional[str] = typer.Option(None, "--out", help=f"Run directory (config, manifest, metrics, checkpoints, final/). Default {DEFAULT_OUT}."),
    init_from_config: Optional[str] = typer.Option(None, "--init-from-config", help="Initialise a fresh student from this model/config directory instead of --student."),
    layers: Optional[int] = typer.Option(None, "--layers", help="With --init-from-config: number of decoder layers."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="With --init-from-config: hidden size (a multiple of head_dim)."),
    online_teacher: Optional[str] = typer.Option(None, "--online-teacher", help="Reference mode: load this teacher (the store's) and train on its full distribution, run every step; the store gives only the token order. For measuring what caching costs."),
    loss: Optional[str] = typer.Option(None, "--loss", help=with_default("fkl | rkl | jsd | skl | srkl | tvd | sft (CE on the data / teacher generations).", DEFAULTS, "loss")),
    tail: Optional[str] = typer.Option(None, "--tail", help=with_default("Top-k stores' tail: bucket (teacher mass outside top-k as one category) | renorm. Headtail and sampled stores use their weights.", DEFAULTS, "tail")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=with_default("Distillation temperature (headtail and sampled stores: 1 only).", DEFAULTS, "temperature")),
    ce_weight: Optional[float] = typer.Option(None, "--ce-weight", help=with_default("Mix in CE on the data tokens: loss = (1-w) KD + w CE.", DEFAULTS, "ce_weight")),
    beta: Optional[float] = typer.Option(None, "--beta", help=with_default("Generalised JSD beta in (0,1).", DEFAULTS, "beta")),
    alpha: Optional[float] = typer.Option(None, "--alpha", help=with_default("Skew KL / skew reverse KL alpha in [0,1).", DEFAULTS, "alpha")),
    beyond_topk: Optional[int] = typer.Option(None, "--beyond-topk", help=with_default("Headtail stores from vLLM: K' > 0 trains the teacher's never-drawn mass against the student's mass outside its own top-K' (its estimate of that set) instead of outside the row's stored ids, where undrawn mid-tail tokens share the push (docs/train.md). Experimental.", DEFAULTS, "beyond_topk")),
    draw_estimator: Optional[str] = typer.Option(None, "--draw-estimator", help=with_default("Headtail and sampled stores: how the draws estimate the teacher's tail. is: the importance-sampled sum | cv (experimental): the student's own tail as a control variate, noiseless at the teacher but noisier far from it; it trained worse students on SmolLM2 (docs/train.md).", DEFAULTS, "draw_estimator")),
    average: Optional[str] = typer.Option(None, "--average", help=with_default("token (every trained position weighs the same) | sequence (length-normalised).", DEFAULTS, "average")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (or --epochs)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the store (default 1 when --max-steps is not given)."),
    lr: Optional[float] = typer.Option(None, "--lr", help=with_default("Peak learning rate (AdamW, warmup then cosine).", DEFAULTS, "lr")),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Default min(100, 5% of the steps)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help=with_default("Max gradient norm (0 = off).", DEFAULTS, "grad_clip")),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help=with_default("Tokens per optimizer step (global, all processes).", DEFAULTS, "batch_tokens")),
    seed: Optional[int] = typer.Option(None, "--seed", help=with_default("Shuffle order and fresh-model init.", DEFAULTS, "seed")),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help=with_default("Fraction of samples (by content hash) never trained on.", DEFAULTS, "heldout_fraction")),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help=with_default("Held-out samples evaluated.", DEFAULTS, "eval_samples")),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help=with_default("Steps between held-out evaluations.", DEFAULTS, "eval_every")),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help=with_default("Steps between checkpoints.", DEFAULTS, "ckpt_every")),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help=with_default("Checkpoints kept.", DEFAULTS, "keep_checkpoints")),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the last checkpoint in --out."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace an earlier run's checkpoints and final/ in --out."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop after N steps in this session, with a checkpoint (continue with --resume)."),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="Shard the student with FSDP under torchrun (students too big for one GPU)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help=with_default("torch.compile the student's decoder (dynamic shapes); compilation takes a while on the first steps.", DEFAULTS, "compile")),
    precision: Optional[str] = typer.Option(None, "--precision", help=with_default("Forward passes: auto (bf16 autocast on CUDA, float32 on the CPU), fp32 or bf16.", DEFAULTS, "precision")),
    workers: Optional[int] = typer.Option(None, "--workers", help=with_default("Shard-decoding threads.", DEFAULTS, "workers")),
    shuffle_shards: Optional[int] = typer.Option(None, "--shuffle-shards", help=with_default("Shards mixed together by the shuffle.", DEFAULTS, "shuffle_shards")),
    logit_chunk: Optional[int] = typer.Option(None, "--logit-chunk", help="Rows per lm_head chunk (default: ~8M logits per chunk on the CPU, ~64M on CUDA)."),
    hint_weight: Optional[float] = typer.Option(None, "--hint-weight", help=with_default("Hint (feature) KD: add W x the hint loss between the student's hidden states (through learned linear maps) and the teacher's stored ones; needs a store cached with --hidden-layers. 0 = off.", DEFAULTS, "hint_weight")),
    hint_map: Optional[str] = typer.Option(None, "--hint-map", help="Student:teacher layer pairs, e.g. 1:4,2:8 (0 = embeddings, i = after block i; teacher layers the store holds). Default: each stored teacher layer t with student layer floor(t * S / T + 1/2)."),
    hint_loss: Optional[str] = typer.Option(None, "--hint-loss", help=with_default("mse (relative to the stored layer's variance) | cosine.", DEFAULTS, "hint_loss")),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard events (if installed)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help=with_default("Steps per tokens/s window.", DEFAULTS, "log_every")),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar. Default on."),
    profile_steps: Optional[int] = typer.Option(None, "--profile-steps", help="Profile N steps (after 2 warm-up steps) with torch.profiler: RUN/profile/profile.md (time per phase: data wait, host->device, forward, loss, backward, optimizer; the loader's decode rate vs the step's), profile.json, trace.json (Chrome trace). Training goes on afterwards."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of these options (flags override it)."),
    on_policy_rounds: int = typer.Option(0, "--on-policy-rounds", help="On-policy rounds R (needs --prompts; --teacher defaults to the teacher STORE records, if that directory exists here): the steps (--max-steps, else the batches --epochs passes over STORE give) split into R+1 phases; after each but the last the student generates responses to --prompts, the teacher scores them in a `kdship cache --mode score` subprocess (never in this process) into RUN/rounds/r/store, and later phases mix those stores in. Reverse KL (--loss rkl) is the literature's choice here (MiniLLM, GKD). Resumable with --resume."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="On-policy: JSONL of {prompt} or {messages} rows the student answers each round."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="On-policy: the store's teacher directory; only the scoring subprocess (and --mix-teacher's generation) loads it."),
    on_policy_fraction: float = typer.Option(0.5, "--on-policy-fraction", help="On-policy: probability that a batch comes from the round stores (all rounds so far, equally) instead of STORE."),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", help="On-policy: responses per prompt and round."),
    on_policy_max_new_tokens: int = typer.Option(128, "--on-policy-max-new-tokens", help="On-policy: tokens per generated response."),
    mix_teacher: float = typer.Option(0.0, "--mix-teacher", help="On-policy: sample each token from a*p_teacher + (1-a)*p_student (MiniLLM's teacher-mixed sampling). a > 0 loads the teacher (transformers) during the generate phase only, beside the student, and releases it before scoring and training."),
    score_backend: Optional[str] = typer.Option(None, "--score-backend", help="On-policy: the cache backend that scores the rounds (vllm | hf). Default: the one STORE's header records (vllm when it does not say)."),
) -> None:
    """Train a student from a teacher store (the teacher is never loaded).

    Single process: `kdship train STORE --student DIR --out RUN`. Several: `torchrun --nproc-per-node N
    -m kdship train ...` (DDP; add --fsdp to shard).
    """
    import json
    import logging
    import os

    from kdship.config import ConfigError
    from kdship.store import StoreError
    from kdship.train.trainer import TrainError, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in locals().items() if k in _OPTION_NAMES}
    try:
        if on_policy_rounds:
            from kdship.train.onpolicy import train_on_policy

            summary = train_on_policy(
                store, student, out or DEFAULT_OUT, config, on_policy_rounds, prompts, teacher, fraction=on_policy_fraction,
                samples_per_prompt=samples_per_prompt, max_new_tokens=on_policy_max_new_tokens, mix_teacher=mix_teacher,
                score_backend=score_backend, **flags,
            )
        elif prompts or teacher or mix_teacher:
            raise TrainError("--prompts, --teacher and --mix-teacher apply to --on-policy-rounds R only")
        else:
            summary = train(store, student=student, out=out or DEFAULT_OUT, config=config, **flags)
    except (TrainError, StoreError, ConfigError, ValueError) as e:
        typer.echo(f"kdship train: error: {e}", err=True)
        raise typer.Exit(2)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        typer.echo(json.dumps(summary, indent=1, default=str))


_OPTION_NAMES = {
    "init_from_config", "online_teacher", "layers", "hidden", "loss", "tail", "temperature", "ce_weight", "beta", "alpha", "beyond_topk", "draw_estimator", "average",
    "max_steps", "epochs", "lr", "warmup_steps", "weight_decay", "grad_clip", "batch_tokens", "seed", "heldout_fraction",
    "eval_samples", "eval_every", "ckpt_every", "keep_checkpoints", "resume", "overwrite", "stop_after", "fsdp", "precision", "compile", "workers",
    "shuffle_shards", "logit_chunk", "tensorboard", "log_every", "progress", "profile_steps", "hint_weight", "hint_map", "hint_loss",
}
