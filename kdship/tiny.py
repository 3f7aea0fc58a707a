"""Tiny, locally built Llama models and corpora for tests, benches and the offline fallback demo.

No model hub is needed: a byte-level BPE tokenizer is trained with ``tokenizers`` on a seeded
synthetic corpus, and a ``LlamaConfig`` is initialised with seeded random weights. Head dim is 64
because vLLM's CPU attention kernels reject small heads (head_dim=16 fails).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a one two three red green blue small large quick slow cat dog bird fish tree river hill "
    "city road house runs jumps sees eats finds makes takes gives near over under with from into "
    "and but or because when then so very not all some many few good bad old new happy sad "
    "what where who how why is are was were will can may must plus minus equals answer question"
).split()


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """Seeded pseudo-English sentences with some structure (so a model can learn something)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(4, 14)
        start = rng.randrange(len(_WORDS))
        words = [_WORDS[(start + 3 * i + rng.randint(0, 2)) % len(_WORDS)] for i in range(k)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return out


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0, corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus if corpus is not None else synthetic_sentences(4000, seed)
    special = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int | None = None,
    vocab_size: int = 512,
    max_positions: int = 512,
    seed: int = 0,
    init_range: float = 0.2,
    tokenizer_dir: str | Path | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """Save a seeded random Llama (safetensors, fp32) with its tokenizer to ``out_dir``.

    ``init_range`` larger than the usual 0.02 makes the random teacher's next-token distributions
    peaked rather than near-uniform, which is closer to a trained model's and makes top-k matter.
    ``tokenizer_dir`` reuses an existing tokenizer (a student must share its teacher's).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.save_pretrained(out)
    else:
        tok = build_tokenizer(out, vocab_size=vocab_size, seed=seed)
    vocab = len(tok)
    assert hidden % heads == 0
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        initializer_range=init_range,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p
