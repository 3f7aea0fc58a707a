"""``kdship train``: a student learns from a teacher store; the teacher's weights are never loaded.

The loop, nanoGPT style::

    for step in range(start, max_steps):
        batch  = next(loader)                       # packed samples + their stored top-k rows
        hidden = student.decoder(batch.input_ids)   # [R, C, H]
        loss   = DistillLoss(hidden[pred], lm_head.weight, batch.rows)   # chunked lm_head, see losses.py
        loss.backward(); clip; optimizer.step(); scheduler.step()
        log metrics; every eval_every: held-out KL(teacher || student); every ckpt_every: checkpoint

Run directory::

    RUN_DIR/config.yaml          the resolved config (defaults < --config YAML < flags)
    RUN_DIR/kdship_run.json      the run manifest (store, held-out rule, loss, student; kdship.run_manifest),
                                 also in final/: what `kdship export` and the demo read
    RUN_DIR/metrics.jsonl        one record per step (loss parts, lr, tokens/s, memory) and per eval
    RUN_DIR/loss.png             loss and held-out KL curves
    RUN_DIR/checkpoints/step_N/  model.safetensors, state.pt (optimizer, tensors only), state.json
    RUN_DIR/final/               the student: an HF directory with its tokenizer (transformers, vLLM)
    RUN_DIR/tb/                  TensorBoard events, when --tensorboard and tensorboard is installed

Reference mode, ``online_teacher=DIR`` (``--online-teacher``): the teacher *is* loaded and run on every
batch's packed input under no_grad, and the rows' targets are its full-vocabulary log-softmax instead
of the stored ones (the store then supplies only the token order). Same loop, loader order, averaging
and chunked loss, so the difference to a store-trained student is exactly what caching costs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdship.heldout import DEFAULT_HELDOUT_FRACTION
from kdship.run_manifest import MANIFEST_FILE, RunManifest, replace_final
from kdship.train.profile import OFF

log = logging.getLogger("kdship.train")

DEFAULT_OUT = "runs/student"
HINT_MAP_FILE = "hint_map.safetensors"  # in a checkpoint: hint KD's learned maps
DEFAULTS: dict[str, Any] = {
    "student": None,
    "init_from_config": None,
    "online_teacher": None,
    "layers": None,
    "hidden": None,
    "loss": "fkl",
    "tail": "bucket",
    "temperature": 1.0,
    "ce_weight": 0.5,  # KD + CE on the data tokens: beat SFT on held-out perplexity, KL and OOD where pure KD did not (bench/train_recipe_demo.py)
    "beta": 0.5,
    "alpha": 0.1,
    "beyond_topk": 0,  # headtail's beyond bucket against the student's own far tail (LossConfig.beyond_topk)
    "draw_estimator": "is",  # sparse draws: plain importance-sampled sum; "cv" is experimental (LossConfig.draw_estimator)
    "average": "token",
    "max_steps": None,
    "epochs": None,
    "lr": 3e-4,
    "min_lr_ratio": 0.1,
    "warmup_steps": None,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "batch_tokens": 4096,
    "seed": 0,
    "heldout_fraction": DEFAULT_HELDOUT_FRACTION,
    "eval_samples": 64,
    "eval_every": 100,
    "ckpt_every": 200,
    "keep_checkpoints": 2,
    "resume": False,
    "overwrite": False,
    "stop_after": None,
    "fsdp": False,
    # auto: bf16 autocast on CUDA (student and online teacher), float32 on the CPU; fp32: never; bf16: always
    "precision": "auto",
    # torch.compile the student's decoder (dynamic shapes: packed batches vary). Off until a GPU run shows
    # it faster (bench/gpu.sh measures both); on the CPU it costs ~40 s of compilation first
    "compile": False,
    "workers": 2,
    "shuffle_shards": 4,
    "logit_chunk": None,
    "hint_weight": 0.0,  # hint (feature) KD from the store's teacher hidden states (kdship.train.hint); 0 = off
    "hint_map": None,
    "hint_loss": "mse",
    "tensorboard": False,
    "log_every": 10,
    "progress": True,
    "profile_steps": None,  # N: profile N steps after a short warm-up into RUN_DIR/profile/ (kdship.train.profile)
    # on-policy rounds (kdship.train.onpolicy): more stores, drawn from with total probability mix_fraction
    "mix_stores": None,
    "mix_fraction": 0.0,
}


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device_type: str):
    """The autocast dtype of the forward passes (None: float32): ``auto`` is bf16 on CUDA only."""
    import torch

    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


class TrainError(ValueError):
    """Bad input to ``kdship train``; the message names the option, file or store."""


# --------------------------------------------------------------------------------------------------
# Student and tokenizer


def _tokenizer_sha256(tok) -> str:
    from kdship.fingerprint import tokenizer_sha256

    return tokenizer_sha256(tok)


def check_tokenizer(store_header: dict[str, Any], tok, student_name: str, store: str, role: str = "student") -> None:
    """Refuse a student (or an online teacher: ``role``) whose token -> id map differs from the store's teacher."""
    teacher = store_header.get("teacher") or {}
    want = teacher.get("tokenizer_sha256")
    got = _tokenizer_sha256(tok)
    if want is None:
        raise TrainError(f"{store}: the store header has no teacher.tokenizer_sha256; cannot check the student's tokenizer")
    if want == got:
        return
    detail = ""
    tpath = teacher.get("name_or_path")
    try:
        if tpath and Path(tpath).is_dir():
            from transformers import AutoTokenizer

            tv, sv = AutoTokenizer.from_pretrained(tpath).get_vocab(), tok.get_vocab()
            diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])
            detail = f" ({len(tv)} vs {len(sv)} tokens; {len(diff)} token->id pairs differ, e.g. {diff[:3]})"
    except Exception:  # the message is already clear without the diff
        pass
    raise TrainError(
        f"tokenizer mismatch: the {role} {student_name} (tokenizer sha256 {got[:16]}) does not share the tokenizer of "
        f"the store's teacher {teacher.get('name_or_path')} (tokenizer sha256 {want[:16]}){detail}. "
        "Token ids would mean different tokens; kdship does not remap ids. "
        + ("Use a student with the teacher's tokenizer." if role == "student" else "Use the store's teacher.")
    )


def _shrunk_config(cfg, layers: int | None, hidden: int | None):
    """A smaller copy of an architecture: fewer layers and/or a narrower hidden size (head_dim kept)."""
    import copy

    cfg = copy.deepcopy(cfg)
    if layers is not None:
        if layers < 1:
            raise TrainError(f"--layers must be >= 1, got {layers}")
        cfg.num_hidden_layers = int(layers)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[:layers]
    if hidden is not None:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if hidden % head_dim:
            raise TrainError(f"--hidden {hidden} must be a multiple of the architecture's head_dim {head_dim}")
        heads = hidden // head_dim
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        kv = max(d for d in range(1, min(kv, heads) + 1) if heads % d == 0)
        ratio = hidden / cfg.hidden_size
        if getattr(cfg, "intermediate_size", None):
            cfg.intermediate_size = max(8, int(round(cfg.intermediate_size * ratio / 8)) * 8)
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = hidden, heads, kv, head_dim
    return cfg


def load_student(student: str | None, init_from_config: str | None, layers: int | None, hidden: int | None, seed: int):
    """(model, tokenizer, name). Either an HF directory to start from, or a config to initialise fresh."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if student and init_from_config:
        raise TrainError(f"give either --student ({student}) or --init-from-config ({init_from_config}), not both")
    if not student and not init_from_config:
        raise TrainError("no student: give --student HF_DIR, or --init-from-config DIR [--layers N --hidden H]")
    if student and (layers is not None or hidden is not None):
        raise TrainError("--layers/--hidden apply to --init-from-config only (a --student directory is used as it is)")
    src = student or init_from_config
    if not Path(src).is_dir():
        raise TrainError(f"{'--student' if student else '--init-from-config'} {src}: not a directory")
    tok = _load_tokenizer(src, src)
    if student:
        model = _load_model(student, f"--student {student}")
        name = str(student)
    else:
        cfg = _shrunk_config(AutoConfig.from_pretrained(init_from_config), layers, hidden)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        name = f"a fresh model from {init_from_config} (layers={cfg.num_hidden_layers}, hidden={cfg.hidden_size})"
    return model, tok, name


def _load_tokenizer(path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise TrainError(f"{what}: no loadable tokenizer ({e})") from e


def _load_model(path, what: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise TrainError(f"{what}: transformers cannot load it ({e})") from e


def load_online_teacher(path: str, store_header: dict[str, Any], store: str, vocab_tok: int, device):
    """The teacher for online full-logit KD (reference mode): the store's tokenizer and vocabulary, or refused."""
    if not Path(path).is_dir():
        raise TrainError(f"--online-teacher {path}: not a directory")
    check_tokenizer(store_header, _load_tokenizer(path, f"--online-teacher {path}"), str(path), store, role="online teacher")
    model = _load_model(path, f"--online-teacher {path}")
    rows = model.get_output_embeddings().weight.shape[0]
    want = (store_header.get("teacher") or {}).get("vocab_size")
    if (want is not None and rows != int(want)) or rows < vocab_tok:
        raise TrainError(
            f"vocabulary mismatch: the online teacher {path} has {rows} output rows, the store's teacher "
            f"{(store_header.get('teacher') or {}).get('name_or_path')} has {want} (the tokenizer {vocab_tok} tokens); its "
            "distributions would not be over the store's vocabulary. Use the store's teacher."
        )
    if getattr(model.config, "final_logit_softcapping", None):
        raise TrainError(f"--online-teacher {path}: final-logit soft-capping is not implemented (the logits are taken from its lm_head)")
    try:  # a different teacher with the same tokenizer is allowed, but the reference is then not the store's
        from kdship.fingerprint import weights_sha256

        want_w = (store_header.get("teacher") or {}).get("weights_sha256")
        if want_w and weights_sha256(path) != want_w:
            log.warning("--online-teacher %s: its weights differ from the store's teacher (%s)", path, (store_header.get("teacher") or {}).get("name_or_path"))
    except Exception:  # only a warning
        pass
    model.config.use_cache = False
    return model.to(device).eval()


def online_rows(teacher, batch, vocab_tok: int, device, autocast_dtype):
    """The batch's rows with the teacher's full distribution as targets (ids 0..vocab_tok-1 implied).

    The teacher sees the student's exact input (packed rows, restarting position ids) and only the
    predicting positions go through its lm_head; ids beyond the tokenizer are never targets.
    """
    import torch

    from kdship.train.loader import Rows
    from kdship.train.losses import matmul_acc

    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _nullctx()
    with torch.no_grad():
        with ctx:
            decoder = getattr(teacher, teacher.base_model_prefix)
            hidden = decoder(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])[batch.pred_index.to(device)]
        head = teacher.get_output_embeddings()
        mm = autocast_dtype or h.dtype  # the student's lm_head precision (losses.fused_head_loss), fp32 logits either way
        z = matmul_acc(h.to(mm), head.weight.to(mm).T, torch.float32)
        if getattr(head, "bias", None) is not None:
            z += head.bias.float()
        z -= torch.logsumexp(z, -1, keepdim=True)  # in place: one [N, V] buffer
    r = batch.rows
    return Rows(topk_ids=None, topk_logprobs=z[:, :vocab_tok], target_weights=None, targets=r.targets.to(device), row_weight=r.row_weight.to(device),
                hint_targets=None if r.hint_targets is None else r.hint_targets.to(device))


# --------------------------------------------------------------------------------------------------
# Distributed


class _Dist:
    def __init__(self, fsdp: bool):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world > 1
        self.fsdp = fsdp
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        if fsdp and not self.enabled:
            log.warning("--fsdp with one process: nothing to shard; training unsharded")
            self.fsdp = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _make_wrapper(model, loss_fn, autocast_dtype, hint=None):
    import torch

    class StudentWithLoss(torch.nn.Module):
        """forward(batch) -> (loss, parts): the decoder, then the fused chunked lm_head loss, plus
        ``hint.weight`` x the hint loss when hint KD is on (training only; evaluation is the logit KL)."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.loss_fn = loss_fn  # swapped for the held-out KL during evaluation
            self.hint = hint  # a kdship.train.hint.HintHead or None; inside the module so DDP / FSDP see it
            self.profiler = OFF  # a kdship.train.profile.StepProfiler while --profile-steps times steps
            # --compile: the compiled decoder, kept out of the module tree (its state dict stays the model's)
            self.__dict__["compiled_decoder"] = None

        def forward(self, input_ids, position_ids, pred_index, rows):
            """(loss, parts): parts is a detached tensor [loss, kd, ce, hint] on the device, read by the
            caller once per step (a host read here would stall the queue before the backward)."""
            decoder = self.compiled_decoder if self.compiled_decoder is not None else getattr(self.model, self.model.base_model_prefix)
            with_hint = self.hint is not None and self.training
            ctx = torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype else _nullctx()
            with self.profiler.phase("forward"), ctx:
                # the intermediate states only when hint KD needs them: the default path is unchanged
                out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=with_hint)
            with self.profiler.phase("loss"):
                hidden = out.last_hidden_state
                h = hidden.reshape(-1, hidden.shape[-1])[pred_index]
                weight = self.model.get_output_embeddings().weight
                loss, parts = self.loss_fn.parts_tensor(h, weight, rows, matmul_dtype=autocast_dtype)
                hint_part = torch.zeros_like(parts[:1])
                if with_hint:
                    hint_loss = self.hint(out.hidden_states, pred_index, rows)
                    loss = loss + self.hint.weight * hint_loss
                    hint_part = hint_loss.detach().reshape(1).to(parts.dtype)
                    parts = parts + torch.cat([self.hint.weight * hint_part, torch.zeros_like(parts[1:])])
            return loss, torch.cat([parts, hint_part])

    return StudentWithLoss()


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _ckpt_dirs(out: Path) -> list[Path]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step_") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _full_state_dicts(wrapper, model, optimizer, dist_ctx):
    """Model and optimizer state as full (unsharded) dicts on the CPU, and the hint maps' state (None
    without hint KD: they are checkpointed, never part of the exported student)."""
    hint = getattr(wrapper, "hint", None)
    if dist_ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # with hint KD the optimizer also holds the maps' parameters: take both through the wrapper
        module = model if hint is None else wrapper
        sd, osd = get_model_state_dict(module, options=opts), get_optimizer_state_dict(module, optimizer, options=opts)
        if hint is None:
            return sd, osd, None
        return _sub_state(sd, "model."), osd, _sub_state(sd, "hint.")
    hint_sd = None if hint is None else {k: v.detach().cpu() for k, v in hint.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, optimizer.state_dict(), hint_sd


def _sub_state(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, loader_state, extra: dict, dist_ctx, wrapper, keep: int) -> Path | None:
    """Write step_N.partial/, then rename it to step_N/ (a crash leaves no half checkpoint)."""
    import torch
    from safetensors.torch import save_file

    model_sd, optim_sd, hint_sd = _full_state_dicts(wrapper, model, optimizer, dist_ctx)
    if not dist_ctx.main:
        return None
    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # tied weights share storage; store each tensor once under its own name (clone breaks sharing)
    save_file({k: v.contiguous().clone() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
    if hint_sd is not None:  # hint KD's learned maps: resumed with the student, never exported
        save_file({k: v.contiguous() for k, v in hint_sd.items()}, str(tmp / HINT_MAP_FILE))
    torch.save({"optimizer": optim_sd, "rng_cpu": torch.get_rng_state()}, tmp / "state.pt")
    state = {"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state, **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _ckpt_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model, sd: dict, ckpt: Path) -> None:
    """A checkpoint's model weights into an unsharded student (a tied lm_head may be absent)."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.endswith("lm_head.weight")] + list(unexpected)
    if bad:
        raise TrainError(f"{ckpt}: checkpoint does not fit the student (missing/unexpected: {bad[:5]})")


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, dist_ctx, wrapper=None) -> dict:
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"))
    blob = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    hint = getattr(wrapper, "hint", None)
    hint_sd = None
    if hint is not None:
        if not (ckpt / HINT_MAP_FILE).is_file():
            raise TrainError(f"{ckpt}: no {HINT_MAP_FILE} (the run was started without --hint-weight); resume with its settings")
        hint_sd = load_file(str(ckpt / HINT_MAP_FILE))
    if dist_ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        module = model if hint is None else wrapper
        if hint is not None:
            sd = {**{f"model.{k}": v for k, v in sd.items()}, **{f"hint.{k}": v for k, v in hint_sd.items()}}
        set_model_state_dict(module, sd, options=opts)
        set_optimizer_state_dict(module, optimizer, blob["optimizer"], options=opts)
    else:
        load_weights(model, sd, ckpt)
        if hint is not None:
            hint.load_state_dict(hint_sd)
        optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng_cpu"])
    state = json.loads((ckpt / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    return state


# --------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self, out: Path, main: bool, tensorboard: bool, truncate_after: int | None):
        self.path = out / "metrics.jsonl"
        self.main = main
        self.records: list[dict] = []
        if main and truncate_after is not None and self.path.is_file():
            # resuming: drop what was logged after the checkpoint (those steps are redone)
            keep = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            keep = [r for r in keep if r.get("step", 0) <= truncate_after]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
            self.records = keep
        elif main:
            self.path.write_text("")
        self.tb = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception as e:  # optional
                log.warning("TensorBoard not available (%s); metrics.jsonl only", e)

    def log(self, rec: dict) -> None:
        if not self.main:
            return
        self.records.append(rec)
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def plot(self, png: Path) -> None:
        if not self.main:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = [r for r in self.records if "loss" in r]
        ev = [r for r in self.records if "heldout_kl" in r]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1)
        ax[0].set(xlabel="step", ylabel="training loss", title="loss")
        if ev:
            ax[1].plot([r["step"] for r in ev], [r["heldout_kl"] for r in ev], marker="o")
        ax[1].set(xlabel="step", ylabel="nat / position", title="held-out KL(teacher || student), top-k + rest")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


TEST_KILL_AT = "KDSHIP_TEST_KILL_AT"


def kill_point_for_tests(phase: str, n: int) -> None:
    """Tests only (tests/test_onpolicy.py): with $KDSHIP_TEST_KILL_AT = "PHASE:N" the process SIGKILLs
    itself at that point ("train:7" after training step 7, "generate:1" inside round 1's generation),
    as a crash would: a deterministic place to kill, where a timed kill would race a fast phase."""
    if os.environ.get(TEST_KILL_AT) == f"{phase}:{n}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # This process's own peak RSS. Not ru_maxrss: Linux carries it over fork + exec, so a trainer started
    # from a big process (a notebook, a pipeline holding a teacher) would report its parent's peak.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(train_module, wrapper, batches, device, vocab_size: int, chunk_rows=None, rows_fn=None) -> dict[str, float]:
    """Held-out KL(teacher || student) over the stored top-k plus one "rest" category, and CE (nat/row).

    With k = vocab (or ``rows_fn`` giving an online teacher's full rows) this is the exact KL;
    headtail / sampled stores: the unbiased estimate through their weights; a store without the draws'
    logprobs (kdship cache's default): its exact entries and one rest category (``eval_batches``);
    otherwise a lower bound of it (the tail is lumped). Runs the
    (possibly DDP/FSDP-wrapped) training module with its loss swapped, so sharded students work too.
    """
    import torch

    from kdship.train.losses import DistillLoss, LossConfig

    kl = DistillLoss(LossConfig(kind="fkl", tail="bucket", chunk_rows=chunk_rows), vocab_size)
    saved, wrapper.loss_fn = wrapper.loss_fn, kl
    was = wrapper.training
    wrapper.eval()
    tot = {"heldout_kl": 0.0, "heldout_ce": 0.0}
    try:
        with torch.no_grad():
            for b in batches:
                rows = rows_fn(b) if rows_fn is not None else b.rows.to(device)
                _, parts = train_module(b.input_ids.to(device), b.position_ids.to(device), b.pred_index.to(device), rows)
                _, kd, ce, _ = parts.tolist()
                tot["heldout_kl"] += kd
                tot["heldout_ce"] += ce
    finally:
        wrapper.loss_fn = saved
        wrapper.train(was)
    return tot


# --------------------------------------------------------------------------------------------------
# The loop


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def train(store: str, student: str | None = None, out: str = DEFAULT_OUT, config: str | None = None, **options: Any) -> dict[str, Any]:
    """Train ``student`` (or a fresh model) on ``store``; write the run to ``out``. Returns a summary.

    ``options``: any key of ``DEFAULTS`` (they override ``config``, a YAML file). The steps, in order:
    settings, model, optimizer, resume (or a fresh run directory), the loop, the final model.
    """
    import torch

    from kdship.store import StoreReader

    cfg = _resolve_settings(store, student, config, options)
    header = StoreReader(store, verify=False).header
    _check_store_settings(header, cfg, str(store))
    for extra in cfg["mix_stores"] or []:
        extra_header = StoreReader(extra, verify=False).header
        check_same_teacher(header, extra_header, str(store), str(extra))
        _check_draw_logprobs(extra_header, cfg, str(extra))
    run = _Run(cfg=cfg, store=str(store), out_dir=Path(out), dist=_Dist(bool(cfg["fsdp"])))
    run.autocast_dtype = autocast_dtype(cfg["precision"], run.dist.device.type)
    _setup_model(run, header)
    _setup_optimizer(run)
    _resume_or_start(run)
    return _train_loop(run)


@dataclass
class _Run:
    """What the steps of ``train`` share: settings, the student and its wrappers, optimizer, progress."""

    cfg: dict[str, Any]
    store: str
    out_dir: Path
    dist: Any
    autocast_dtype: Any = None
    model: Any = None
    tok: Any = None
    student_name: str = ""
    vocab_tok: int = 0
    teacher: Any = None  # --online-teacher only
    wrapper: Any = None  # student + fused loss in one module (what DDP / FSDP wrap)
    train_module: Any = None
    optimizer: Any = None
    scheduler: Any = None
    total_steps: int = 0
    start_step: int = 0
    tokens_seen: int = 0
    loader_state: Any = None
    resumed_from: str | None = None

    @property
    def device(self):
        return self.dist.device

    def rows_of(self, batch):
        """The batch's target rows on the device: the store's, or the online teacher's full distribution."""
        if self.teacher is not None:
            return online_rows(self.teacher, batch, self.vocab_tok, self.device, self.autocast_dtype)
        rows = batch.rows.to(self.device)
        # a mixed-in on-policy round store holds the student's own samples: CE there would be the
        # student imitating itself, so those rows teach through the teacher's targets only
        rows.ce_on_data = batch.source in (None, "main")
        return rows

    def make_loader(self, state=None, max_epochs=None):
        from kdship.train.loader import MixedLoader, StoreLoader

        c = self.cfg

        def store_loader(store, state=None, max_epochs=None):
            return StoreLoader(
                store, int(c["batch_tokens"]), seed=int(c["seed"]), heldout_fraction=float(c["heldout_fraction"]),
                eval_samples=int(c["eval_samples"]), shuffle_shards=int(c["shuffle_shards"]), workers=int(c["workers"]),
                average=c["average"], rank=self.dist.rank, world_size=self.dist.world, max_epochs=max_epochs, state=state,
                with_hidden=self.wrapper is not None and self.wrapper.hint is not None, with_drawn=c["draw_estimator"] == "cv",
                pin_memory=self.device.type == "cuda",
            )

        if not c["mix_stores"]:
            return store_loader(self.store, state, max_epochs)
        # the main store keeps 1 - mix_fraction; the mixed-in stores share mix_fraction equally and cycle
        lam, extra = float(c["mix_fraction"]), list(c["mix_stores"])
        stores = [("main", store_loader(self.store, max_epochs=max_epochs), 1.0 - lam)]
        stores += [(f"mix_{i}", store_loader(p), lam / len(extra)) for i, p in enumerate(extra)]
        return MixedLoader(stores, seed=int(c["seed"]), state=state)

    def checkpoint(self, step: int, loader_state) -> None:
        save_checkpoint(self.out_dir, step, self.model, self.optimizer, self.scheduler, loader_state, {"tokens_seen": self.tokens_seen, "config": self.cfg},
                        self.dist, self.wrapper, int(self.cfg["keep_checkpoints"]))


def _resolve_settings(store, student, config, options) -> dict[str, Any]:
    from kdship.config import resolve

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TrainError(f"unknown train option(s): {', '.join(unknown)}")
    cfg = resolve(DEFAULTS, config, {**options, "student": student})
    if cfg["max_steps"] is not None and cfg["epochs"] is not None:
        raise TrainError("give --max-steps or --epochs, not both")
    if cfg["max_steps"] is None and cfg["epochs"] is None:
        cfg["epochs"] = 1
    if cfg["stop_after"] is not None and int(cfg["stop_after"]) < 1:
        raise TrainError(f"--stop-after must be >= 1, got {cfg['stop_after']}")
    if cfg["profile_steps"] is not None and int(cfg["profile_steps"]) < 1:
        raise TrainError(f"--profile-steps must be >= 1, got {cfg['profile_steps']}")
    if cfg["precision"] not in PRECISIONS:
        raise TrainError(f"--precision {cfg['precision']!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg["mix_stores"]:
        if cfg["max_steps"] is None:
            raise TrainError("mixing stores (on-policy rounds) needs --max-steps (an epoch of several stores is not defined)")
        if float(cfg["hint_weight"] or 0) > 0:
            raise TrainError("--hint-weight does not combine with mixed stores (on-policy round stores hold no hidden states)")
        if not 0.0 <= float(cfg["mix_fraction"]) <= 1.0:
            raise TrainError(f"the mixing fraction must be in [0, 1], got {cfg['mix_fraction']}")
    return cfg


def check_same_teacher(header: dict[str, Any], other: dict[str, Any], store: str, other_store: str) -> None:
    """Refuse to mix stores written by different teachers (or tokenizers): their targets mean different things."""
    from kdship.store import TEACHER_IDENTITY_KEYS

    a, b = header.get("teacher") or {}, other.get("teacher") or {}
    differ = [k for k in TEACHER_IDENTITY_KEYS if a.get(k) != b.get(k)]
    if differ:
        raise TrainError(f"{other_store} was written by another teacher than {store} ({', '.join(differ)} differ); stores can be mixed only under one teacher")


def _check_store_settings(header: dict[str, Any], cfg: dict[str, Any], store: str) -> None:
    weighted = header.get("targets") in ("sampled", "headtail")
    if float(cfg["hint_weight"] or 0) < 0:
        raise TrainError(f"--hint-weight {cfg['hint_weight']}: must be >= 0")
    if float(cfg["hint_weight"] or 0) > 0 and not header.get("hidden_states"):
        raise TrainError(
            f"--hint-weight: the store {store} holds no teacher hidden states. Write one with "
            "`kdship cache TEACHER DATA --backend hf --hidden-layers L1,L2 --hidden-dim D --out STORE` (see docs/cache.md)"
        )
    if cfg["loss"] != "sft" and header.get("mode") == "generate" and cfg["ce_weight"] == 0:
        log.info("generate store: KD on the teacher's own samples (use --loss sft for plain sequence-level KD)")
    if weighted and cfg["temperature"] != 1.0 and not cfg["online_teacher"]:
        raise TrainError(f"--temperature: a {header.get('targets')}-targets store was drawn at temperature 1; use --temperature 1")
    _check_draw_logprobs(header, cfg, store)


def _check_draw_logprobs(header: dict[str, Any], cfg: dict[str, Any], store: str) -> None:
    """A headtail store without the draws' logprobs trains fkl and CE only: their gradients need none."""
    from kdship.store import draw_logprobs_stored, recache_command

    if header.get("targets") != "headtail" or draw_logprobs_stored(header) or cfg["online_teacher"]:
        return
    fix = (f"`{recache_command(header, str(store).rstrip('/') + '-full', '--draw-logprobs')}` (the data file as named there) writes one "
           "with them (8 draws, ~47 B/position)")
    if cfg["loss"] not in ("fkl", "sft") and float(cfg["ce_weight"]) < 1.0:
        raise TrainError(f"--loss {cfg['loss']}: the store {store} holds no teacher logprob at its draws (target_sampling.draw_logprobs: false, "
                         f"kdship cache's default store, for fkl and CE), which {cfg['loss']} needs. Use --loss fkl, or {fix}")
    if cfg["draw_estimator"] != "is":
        raise TrainError(f"--draw-estimator {cfg['draw_estimator']}: needs the draws' teacher logprobs, which the store {store} does not hold "
                         f"(target_sampling.draw_logprobs: false). Use --draw-estimator is, or {fix}")


def _setup_model(run: _Run, header: dict[str, Any]) -> None:
    """The student (checked against the store's tokenizer), the fused loss, DDP / FSDP wrapping."""
    from kdship.train.losses import DistillLoss, LossConfig

    cfg = run.cfg
    run.model, run.tok, run.student_name = load_student(cfg["student"], cfg["init_from_config"], cfg["layers"], cfg["hidden"], int(cfg["seed"]))
    check_tokenizer(header, run.tok, run.student_name, run.store)
    run.vocab_tok = len(run.tok)
    model = run.model
    emb_rows = model.get_output_embeddings().weight.shape[0]
    if emb_rows < run.vocab_tok:
        raise TrainError(f"the student's output embedding has {emb_rows} rows but its tokenizer {run.vocab_tok} tokens")
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None) or getattr(head, "bias", None) is not None:
        raise TrainError(f"{run.student_name}: its lm_head has a bias or final-logit soft-capping, which the fused chunked loss does not implement")
    model.to(run.device)
    model.config.use_cache = False
    if cfg["online_teacher"]:
        run.teacher = load_online_teacher(str(cfg["online_teacher"]), header, run.store, run.vocab_tok, run.device)
        if run.dist.main:
            log.info("online KD: targets are %s's full distribution at every step (the store gives the token order only)", cfg["online_teacher"])
    loss_cfg = LossConfig(
        kind=cfg["loss"], tail=cfg["tail"], temperature=float(cfg["temperature"]), ce_weight=float(cfg["ce_weight"]),
        beta=float(cfg["beta"]), alpha=float(cfg["alpha"]), chunk_rows=cfg["logit_chunk"], beyond_topk=int(cfg["beyond_topk"]),
        draw_estimator=str(cfg["draw_estimator"]),
    )
    run.wrapper = _make_wrapper(model, DistillLoss(loss_cfg, vocab_size=run.vocab_tok), run.autocast_dtype, _hint_head(run, header))
    if cfg["compile"]:
        import torch

        run.wrapper.__dict__["compiled_decoder"] = torch.compile(getattr(model, model.base_model_prefix), dynamic=True)
        if run.dist.main:
            log.info("--compile: the decoder is compiled on first use (dynamic shapes)")
    if run.dist.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(model, model.base_model_prefix), "layers", []):
            fully_shard(layer)
        fully_shard(run.wrapper)
        run.train_module = run.wrapper
    elif run.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.train_module = DDP(run.wrapper, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    else:
        run.train_module = run.wrapper


def _hint_head(run: _Run, header: dict[str, Any]):
    """Hint KD's maps and loss (kdship.train.hint), or None when --hint-weight is 0."""
    cfg = run.cfg
    if not float(cfg["hint_weight"] or 0) > 0:
        return None
    from kdship.store import StoreReader
    from kdship.train.hint import HintError, HintHead, resolve_hint_map

    spec = header["hidden_states"]
    proj = StoreReader(run.store, verify=False).projection()
    if proj is None:
        raise TrainError(f"{run.store}: the header declares hidden states but the store has no projection (no shard was written)")
    student_layers = int(run.model.config.num_hidden_layers)
    try:
        pairs = resolve_hint_map(cfg["hint_map"], list(spec["layers"]), int(spec["teacher_layers"]), student_layers, run.store)
        head = HintHead(pairs, list(spec["layers"]), proj.variance, int(run.model.config.hidden_size), int(spec["dim"]), str(cfg["hint_loss"]), float(cfg["hint_weight"]),
                        seed=int(cfg["seed"]))
    except HintError as e:
        raise TrainError(str(e)) from None
    if run.dist.main:
        log.info("hint KD: student:teacher layers %s, %s loss, weight %s", ",".join(f"{s}:{t}" for s, t in pairs), cfg["hint_loss"], cfg["hint_weight"])
    return head.to(run.device)


def _adamw_impl(device) -> dict[str, bool]:
    """CUDA: the fused AdamW kernel (one launch for all parameters); the CPU: the foreach one."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _setup_optimizer(run: _Run) -> None:
    """AdamW (no decay on vectors), warmup + cosine over the run's total steps."""
    import torch

    cfg = run.cfg
    decay, no_decay = [], []
    hint_params = list(run.wrapper.hint.parameters()) if run.wrapper.hint is not None else []
    for p in list(run.model.parameters()) + hint_params:
        (decay if p.dim() >= 2 else no_decay).append(p)
    run.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(cfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(cfg["lr"]), betas=(0.9, 0.95), **_adamw_impl(run.device),
    )
    run.total_steps = int(cfg["max_steps"]) if cfg["max_steps"] is not None else run.make_loader(max_epochs=int(cfg["epochs"])).count_batches()
    if run.total_steps < 1:
        raise TrainError(f"{run.store}: nothing to train on (0 steps; is every sample held out or without loss_mask?)")
    warmup = int(cfg["warmup_steps"]) if cfg["warmup_steps"] is not None else min(100, max(1, run.total_steps // 20))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, _lr_lambda(warmup, run.total_steps, float(cfg["min_lr_ratio"])))


def _resume_or_start(run: _Run) -> None:
    """Continue from the last checkpoint (--resume, same settings only) or start a fresh run directory;
    then write the resolved config and the run manifest."""
    from kdship.config import save_yaml

    cfg, out_dir, dist = run.cfg, run.out_dir, run.dist
    if cfg["resume"]:
        ckpts = _ckpt_dirs(out_dir)
        if ckpts:
            saved_cfg = json.loads((ckpts[-1] / "state.json").read_text()).get("config", {})
            changed = [k for k in ("loss", "tail", "batch_tokens", "seed", "lr", "temperature", "ce_weight", "online_teacher", "hint_weight", "hint_map", "hint_loss")
                       if saved_cfg.get(k, DEFAULTS[k]) != cfg[k]]
            if changed:
                raise TrainError(f"--resume {out_dir}: the run was started with different {', '.join(changed)}; resume with the same settings")
            st = load_checkpoint(ckpts[-1], run.model, run.optimizer, run.scheduler, dist, run.wrapper)
            run.start_step, run.tokens_seen, run.loader_state = st["step"], st["tokens_seen"], st["loader"]
            run.resumed_from = str(ckpts[-1])
            if dist.main:
                log.info("resuming from %s (step %d)", ckpts[-1], run.start_step)
        elif dist.main:
            log.info("--resume: no checkpoint in %s; starting fresh", out_dir)
    elif _ckpt_dirs(out_dir) or (out_dir / "final").exists():
        if not cfg["overwrite"]:
            raise TrainError(f"{out_dir} holds an earlier run (checkpoints or final/); pass --resume to continue it, --overwrite to replace it, or another --out")
        dist.barrier()
        if dist.main:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(out_dir / "final", ignore_errors=True)
        dist.barrier()
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml({**cfg, "store": run.store, "out": str(out_dir), "world_size": dist.world, "device": str(run.device)}, out_dir / "config.yaml")
        RunManifest.from_config(cfg, run.store, run.student_name).write(out_dir)
    dist.barrier()


def _optimizer_step(run: _Run, batch, prof) -> Any:
    """Loss, backward, clip, step on one batch. Returns the step's figures as one device tensor
    [loss, kd, ce, hint, grad_norm] (grad_norm NaN without clipping): nothing here reads the device, so
    the host can queue the whole step before it waits, once, when the loop logs it."""
    import torch

    with prof.phase("h2d"):
        ids, pos, pred = (t.to(run.device, non_blocking=True) for t in (batch.input_ids, batch.position_ids, batch.pred_index))
        rows = run.rows_of(batch) if run.teacher is None else None
    if rows is None:
        with prof.phase("teacher"):
            rows = run.rows_of(batch)
    loss, parts = run.train_module(ids, pos, pred, rows)
    with prof.phase("backward"):
        # row weights are global (sum to 1 over all ranks); DDP averages gradients, so scale by world
        (loss * run.dist.world).backward()
    with prof.phase("optimizer"):
        grad_clip = float(run.cfg["grad_clip"]) if run.cfg["grad_clip"] else 0.0
        gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip) if grad_clip else torch.full((), float("nan"), device=parts.device)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP: a DTensor
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return torch.cat([parts, gnorm.detach().reshape(1).to(parts.dtype)])


def _train_loop(run: _Run) -> dict[str, Any]:
    """The loop (nanoGPT style, module docstring), held-out evals and checkpoints; then the summary and
    the final model (or, after --stop-after, a checkpoint to resume from)."""
    cfg, dist, model = run.cfg, run.dist, run.model
    metrics = Metrics(run.out_dir, dist.main, bool(cfg["tensorboard"]), run.start_step if run.resumed_from else None)
    loader = run.make_loader(state=run.loader_state, max_epochs=int(cfg["epochs"]) if cfg["epochs"] is not None else None)
    eval_batches = loader.eval_batches()
    if not eval_batches and dist.main:
        log.warning("%s: no held-out samples (heldout_fraction=%s); held-out KL is not measured", run.store, cfg["heldout_fraction"])

    def run_eval(step: int) -> dict | None:
        if not eval_batches:
            return None
        rec = {"step": step, **evaluate(run.train_module, run.wrapper, eval_batches, run.device, run.vocab_tok, cfg["logit_chunk"], run.rows_of)}
        metrics.log(rec)
        return rec

    first_eval = run_eval(run.start_step) if run.start_step == 0 else None
    stop_at = run.total_steps if cfg["stop_after"] is None else min(run.total_steps, run.start_step + int(cfg["stop_after"]))
    bar = None
    if dist.main and cfg["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total_steps, initial=run.start_step, desc="kdship train", unit="step", mininterval=1.0, dynamic_ncols=True)
    step = run.start_step
    t0 = time.perf_counter()
    window_tokens, window_t = 0, time.perf_counter()
    last_rec: dict = {}
    last_state = run.loader_state
    model.train()
    prof = OFF
    if cfg["profile_steps"]:
        from kdship.train.profile import StepProfiler

        prof = StepProfiler(run.out_dir / "profile", int(cfg["profile_steps"]), run.device)
    run.wrapper.profiler = prof
    with_hint = run.wrapper.hint is not None
    it = iter(loader)
    try:
        while step < stop_at:
            if prof is not OFF:
                prof.begin_step()
            try:
                with prof.phase("data_wait"):
                    batch = next(it)
            except StopIteration:
                break
            figures = _optimizer_step(run, batch, prof)
            step += 1
            run.tokens_seen += batch.global_tokens
            window_tokens += batch.global_tokens
            last_state = batch.state
            with prof.phase("log"):
                loss_l, kd_l, ce_l, hint_l, gnorm = figures.tolist()  # the step's one host read
                loss_g, kd_g, ce_g, hint_g = dist.all_sum([loss_l, kd_l, ce_l, hint_l])
                now = time.perf_counter()
                rec = {
                    "step": step, "epoch": batch.epoch, "loss": loss_g, "kd": kd_g, "ce": ce_g, **({"hint": hint_g} if with_hint else {}),
                    "lr": run.scheduler.get_last_lr()[0],
                    "grad_norm": None if math.isnan(gnorm) else gnorm, "tokens": run.tokens_seen,
                    "tokens_per_s": window_tokens / max(1e-9, now - window_t), "peak_mem_mb": _peak_memory_mb(run.device),
                    "elapsed_s": now - t0,
                }
                if batch.source is not None:
                    rec["source"] = batch.source
                if step % int(cfg["log_every"]) == 0:
                    window_tokens, window_t = 0, now
                metrics.log(rec)
                kill_point_for_tests("train", step)
                last_rec = rec
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_g:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if prof is not OFF:
                prof.end_step(batch.tokens, loader)
            if int(cfg["eval_every"]) > 0 and step % int(cfg["eval_every"]) == 0 and step < run.total_steps:
                run_eval(step)
            if int(cfg["ckpt_every"]) > 0 and step % int(cfg["ckpt_every"]) == 0 and step < run.total_steps:
                run.checkpoint(step, last_state)
    finally:
        if bar is not None:
            bar.close()
        if prof is not OFF:
            prof.close(loader)
            run.wrapper.profiler = OFF
        loader.close()
    if prof is not OFF and prof.done and dist.main:
        log.info("step profile of %d steps: %s", prof.profiled, run.out_dir / "profile" / "profile.md")
    elapsed = time.perf_counter() - t0
    finished = step >= run.total_steps or cfg["stop_after"] is None
    final_eval = run_eval(step) if step > run.start_step or first_eval is None else first_eval
    summary: dict[str, Any] = {
        "out": str(run.out_dir), "steps": step, "total_steps": run.total_steps, "tokens": run.tokens_seen, "seconds": elapsed,
        "tokens_per_s": run.tokens_seen / elapsed if elapsed > 0 and not run.resumed_from else None,
        "loss_last": last_rec.get("loss"), "resumed_from": run.resumed_from, "world_size": dist.world,
        # tied embeddings counted once (as the lm_head, which does the FLOPs): MFU = 6 x this x tokens/s / peak
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "heldout_kl_first": first_eval["heldout_kl"] if first_eval else None,
        "heldout_kl_last": final_eval["heldout_kl"] if final_eval else None,
        "skipped_samples_without_targets": loader.skipped_empty,
    }
    if cfg["mix_stores"]:
        summary["batches_by_source"] = dict(loader.batches_by_source)
    if not finished:  # --stop-after: a checkpoint to resume from, no final model yet
        run.checkpoint(step, last_state)
        summary["final"] = None
    else:
        summary["final"] = _save_final(run.out_dir, model, run.tok, dist, run.wrapper, run.optimizer, summary, run.store)
    if dist.main:
        metrics.plot(run.out_dir / "loss.png")
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    metrics.close()
    dist.barrier()
    dist.close()
    return summary


def _save_final(out_dir: Path, model, tok, dist_ctx, wrapper, optimizer, summary, store) -> str | None:

    model_sd = _full_state_dicts(wrapper, model, optimizer, dist_ctx)[0] if dist_ctx.fsdp else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not dist_ctx.main:
        return None
    tmp = out_dir / "final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.copy2(out_dir / MANIFEST_FILE, tmp / MANIFEST_FILE)
    (tmp / "kdship_train.json").write_text(json.dumps({"store": str(store), **{k: v for k, v in summary.items() if k != "final"}}, indent=1, default=str))
    return str(replace_final(tmp, out_dir))
