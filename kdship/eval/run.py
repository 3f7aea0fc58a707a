"""``kdship eval``: measure several models on one task, their retention of the teacher, and robustness.

    from kdship.eval.run import evaluate
    report = evaluate({"kd": "runs/kd/final", "sft": "runs/sft/final"}, data="gsm_test.jsonl",
                      teacher="models/teacher", ood="ood.jsonl", perturb=("typo", "swap", "distractor"),
                      out="reports/kd")

Splits: ``id`` (``data``), ``ood`` (``ood``), and one seeded adversarial copy of ``id`` per
perturbation (``typo`` / ``swap`` / ``distractor``). Every model is scored on every split; the
reference model (``teacher``: ``--teacher DIR``, or a model named ``teacher``, or ``reference=``)
gives the denominator of retention. ``teacher`` may instead be a kdship store: the LM task then
reports the KL from the stored top-k (matched to the data rows by the sample hash of their tokens).

Writes ``OUT/report.json`` (everything), ``OUT/report.md`` (one table at a glance + details),
``OUT/report.png`` (metric and retention per split) and ``OUT/items.jsonl`` (per item and model:
generation, extracted answer, correct or not, NLL...), so any figure can be traced to its items.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdship.answers import extract_answer
from kdship.eval import metrics as M
from kdship.eval.perturb import parse_perturbations
from kdship.eval.tasks import Item, TaskError, input_text, is_store, lm_tokens, load_items, perturb_item, prompt_tokens

log = logging.getLogger("kdship.eval")

PRIMARY_METRIC = {"lm": "perplexity", "answer": "exact_match", "choice": "accuracy", "generation": "rouge_l_f1"}


class EvalError(ValueError):
    pass


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["kd=runs/kd/final", "runs/sft"]`` -> {"kd": ..., "sft": ...} (a bare path is named by its folder)."""
    out: dict[str, str] = {}
    for s in specs:
        if "=" in s and not Path(s).exists():
            name, path = s.split("=", 1)
        else:
            p = Path(s)
            name, path = (p.parent.name if p.name in ("final", "hf", "onnx") else p.name), s
        name = name.strip()
        if not name or not path:
            raise EvalError(f"model spec {s!r}: expected NAME=PATH or PATH")
        if name in out and out[name] != path:
            raise EvalError(f"model name {name!r} given twice ({out[name]} and {path}); name them NAME=PATH")
        out[name] = path
    return out


def evaluate(
    models: dict[str, str],
    data: str,
    teacher: str | None = None,
    ood: str | None = None,
    perturb: Sequence[str] | str | None = ("typo", "swap", "distractor"),
    out: str = "eval_report",
    task: str | None = None,
    reference: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    perturb_rate: float = 0.1,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    rouge_threshold: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    t0 = time.time()
    models, teacher_store, reference = _resolve_models(models, teacher, reference)
    perturbations = parse_perturbations(perturb)
    task, splits, perturbations, perturb_skipped = _read_splits(data, ood, task, limit, perturbations, seed, perturb_rate)
    if is_store(data) and teacher_store is None:
        teacher_store = str(data)  # a store as data carries its own teacher

    from kdship.eval.models import load_model

    loaded = {name: load_model(name, path, device=device, dtype=dtype) for name, path in models.items()}
    live_teacher = loaded.get("teacher") if teacher_store is None else None
    kl_source = None
    if task == "lm":
        kl_source = "store" if teacher_store else ("live" if live_teacher is not None else None)
    store_index = _StoreIndex(teacher_store) if (task == "lm" and teacher_store) else None

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for split, items in splits.items():
        if task == "lm":
            results[split] = _run_lm(loaded, items, batch_size, live_teacher, store_index, progress, split)
        elif task == "choice":
            results[split] = {n: _run_choice(m, items, batch_size, progress, split) for n, m in loaded.items()}
        else:
            results[split] = {n: _run_generate(m, items, task, batch_size, max_new_tokens, rouge_threshold, progress, split) for n, m in loaded.items()}
            if live_teacher is not None:
                _judge_generations(live_teacher, loaded, items, results[split], batch_size, progress, split)
            for rows in results[split].values():
                for r in rows:
                    r.pop("_ids")
    split_metrics = _split_metrics(task, results, perturbations)

    report = {
        "task": task,
        "primary_metric": PRIMARY_METRIC[task],
        "models": {n: {"path": str(models[n]), "runtime": loaded[n].kind, "device": loaded[n].device} for n in models},
        "reference_model": reference,
        "teacher_store": teacher_store,
        "kl_source": {"store": "teacher store top-k plus one rest bin (a lower bound of the full KL)", "live": "live teacher, full vocabulary", None: None}[kl_source],
        "data": str(data),
        "ood": str(ood) if ood else None,
        "perturbations": perturbations,
        "perturbations_skipped": perturb_skipped,
        "seed": seed,
        "perturb_rate": perturb_rate,
        "rouge_threshold": rouge_threshold if task == "generation" else None,
        "splits": {s: {"items": len(splits[s]), "metrics": split_metrics[s]} for s in splits},
        "retention": _retention_table(split_metrics, reference),
        "retention_note": "ratio = student / teacher; retention = the same oriented so that higher is better and 1.0 is the teacher's level (teacher / student for lower-is-better metrics)",
        "seconds": round(time.time() - t0, 2),
    }
    return _write_report(report, results, splits, Path(out))


def _resolve_models(models: dict[str, str], teacher: str | None, reference: str | None) -> tuple[dict[str, str], str | None, str | None]:
    """The models to load (a live ``teacher`` first), the teacher store if ``teacher`` is one, and the
    reference model's name; every path checked before any data is read, so a typo fails fast."""
    models = dict(models)
    teacher_store = None
    if teacher is not None:
        if is_store(teacher):
            teacher_store = str(teacher)
        else:
            if "teacher" in models and str(models["teacher"]) != str(teacher):
                raise EvalError(f"--teacher {teacher} and a model named 'teacher' ({models['teacher']}) disagree")
            models = {"teacher": str(teacher), **{k: v for k, v in models.items() if k != "teacher"}}
    if not models:
        raise EvalError("no model to evaluate: pass MODEL paths (NAME=PATH) or --teacher DIR")
    for name, path in models.items():
        if "://" not in str(path) and not Path(path).exists():
            raise EvalError(f"model {name!r}: {path} does not exist")
    if reference is None and "teacher" in models:
        reference = "teacher"
    if reference is not None and reference not in models:
        raise EvalError(f"--reference {reference!r} is not one of the models ({', '.join(models)})")
    return models, teacher_store, reference


def _read_splits(data: str, ood: str | None, task: str | None, limit: int | None, perturbations: list[str], seed: int,
                 perturb_rate: float) -> tuple[str, dict[str, list[Item]], list[str], str | None]:
    """The task and its splits: ``id``, ``ood`` and one seeded perturbed copy of ``id`` per perturbation
    (skipped, logged and reported, when the data is a store of token ids: there is no text to edit)."""
    task, id_items = load_items(data, task, limit)
    splits: dict[str, list[Item]] = {"id": id_items}
    if ood:
        _, ood_items = load_items(ood, task, limit)  # the id task: OOD rows must fit it
        splits["ood"] = ood_items
    perturb_skipped = None
    if perturbations and id_items and id_items[0].row is None:
        perturb_skipped = f"--perturb {','.join(perturbations)} skipped: {data} is a store of fixed token sequences, not text"
        log.warning(perturb_skipped)
        perturbations = []
    for kind in perturbations:
        splits[kind] = [perturb_item(it, kind, seed, perturb_rate) for it in id_items]
    return task, splits, perturbations, perturb_skipped


def _split_metrics(task: str, results: dict, perturbations: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per split and model: the task's metrics, plus attack success on the perturbed splits."""
    split_metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for split, per_model in results.items():
        split_metrics[split] = {n: _aggregate(task, rows) for n, rows in per_model.items()}
        if split in perturbations and task != "lm":
            for n, rows in per_model.items():
                before = [r["correct"] for r in results["id"][n]]
                after = [r["correct"] for r in rows]
                split_metrics[split][n].update(M.attack_success(before, after))
    return split_metrics


def _retention_table(split_metrics: dict, reference: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Per split, model and metric: the student's value against the reference's, oriented as retention."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    if reference is None:
        return table
    for split, per_model in split_metrics.items():
        ref = per_model[reference]
        table[split] = {}
        for n, mets in per_model.items():
            if n == reference:
                continue
            table[split][n] = {}
            for metric, hib in M.HIGHER_IS_BETTER.items():
                if metric in mets and metric in ref and metric != "kl_to_teacher":
                    r = M.retention(mets[metric], ref[metric], hib)
                    table[split][n][metric] = {"student": mets[metric], "teacher": ref[metric], "higher_is_better": hib, **r}
    return table


def _write_report(report: dict[str, Any], results: dict, splits: dict[str, list[Item]], outdir: Path) -> dict[str, Any]:
    """report.json, items.jsonl (every item and model), report.md and report.png under ``outdir``."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False), encoding="utf-8")
    with (outdir / "items.jsonl").open("w", encoding="utf-8") as fh:
        for split, per_model in results.items():
            for n, rows in per_model.items():
                for it, r in zip(splits[split], rows):
                    rec = {"split": split, "model": n, "row": it.index, "source": it.source}
                    if it.perturbed:
                        rec["input"] = input_text(it)  # the perturbed text the model saw
                    fh.write(json.dumps(_jsonable({**rec, **r}), ensure_ascii=False) + "\n")
    from kdship.eval.report import write_markdown, write_plot

    write_markdown(report, outdir / "report.md")
    write_plot(report, outdir / "report.png")
    report["files"] = {k: str(outdir / f) for k, f in (("json", "report.json"), ("markdown", "report.md"), ("plot", "report.png"), ("items", "items.jsonl"))}
    return report


# --------------------------------------------------------------------------------------------------
# Aggregation


def _aggregate(task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"items": 0}
    if task == "lm":
        n = sum(r["tokens"] for r in rows)
        nll = sum(r["nll_sum"] for r in rows)
        out = {"items": len(rows), "tokens": n, "nll": nll / n if n else None, "perplexity": M.perplexity(nll, n) if n else None}
        kl_n = sum(r.get("kl_tokens", 0) for r in rows)
        if kl_n:
            out["kl_to_teacher"] = sum(r.get("kl_sum", 0.0) for r in rows) / kl_n
            out["kl_tokens"] = kl_n
        unmatched = sum(1 for r in rows if r.get("kl_unmatched"))
        if unmatched:
            out["kl_unmatched_items"] = unmatched
        return out
    out: dict[str, Any] = {"items": len(rows)}
    if task == "answer":
        out["exact_match"] = float(np.mean([r["correct"] for r in rows]))
        out["answer_found"] = float(np.mean([r["answer"] is not None for r in rows]))
    elif task == "choice":
        out["accuracy"] = float(np.mean([r["correct"] for r in rows]))
        out["accuracy_norm"] = float(np.mean([r["correct_norm"] for r in rows]))
    elif task == "generation":
        for k in ("f1", "precision", "recall"):
            out[f"rouge_l_{k}"] = float(np.mean([r["rouge_l"][k] for r in rows]))
        out["share_above_threshold"] = float(np.mean([r["correct"] for r in rows]))
    if task in ("generation", "answer") and "teacher_nll_sum" in rows[0]:
        n = sum(r["generated_tokens"] for r in rows)
        out["teacher_nll"] = sum(r["teacher_nll_sum"] for r in rows) / n if n else None
        out["generated_tokens"] = n
        out["rouge_l_f1_vs_teacher"] = float(np.mean([r["rouge_l_vs_teacher"]["f1"] for r in rows]))
    if task in ("generation", "answer"):
        out["repeated_4gram_share"] = float(np.mean([r["repeated_4gram_share"] for r in rows]))
    return out


# --------------------------------------------------------------------------------------------------
# Task runners


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _mask_positions(mask: np.ndarray) -> np.ndarray:
    pos = np.nonzero(np.asarray(mask, dtype=bool))[0]
    return pos[pos >= 1]  # row 0 has no prediction


def _tok_key(model) -> str:
    from kdship.fingerprint import tokenizer_sha256

    if not hasattr(model, "_kdship_tok_sha"):
        model._kdship_tok_sha = tokenizer_sha256(model.tokenizer)
    return model._kdship_tok_sha


class _StoreIndex:
    """sample_hash -> (shard path, sample number) for a teacher store; shards read lazily, verified."""

    def __init__(self, url: str):
        from kdship.store import StoreReader

        self.reader = StoreReader(url)
        self.url = url
        self.tokenizer_sha256 = (self.reader.header.get("teacher") or {}).get("tokenizer_sha256")
        self.index: dict[bytes, tuple[str, int]] = {}
        for p in self.reader.shard_paths:
            hashes = np.asarray(self.reader.root[p]["sample_hash"][...])
            for i, h in enumerate(hashes):
                self.index.setdefault(bytes(h), (p, i))
        self._shards: dict[str, Any] = {}

    def lookup(self, tokens: np.ndarray) -> dict[str, np.ndarray] | None:
        from kdship.store import sample_hash

        hit = self.index.get(bytes(sample_hash(np.asarray(tokens, dtype=np.int32))))
        if hit is None:
            return None
        p, i = hit
        if p not in self._shards:
            self._shards[p] = self.reader.read_shard(p)
        return self._shards[p].sample(i)


def _run_lm(loaded: dict, items: list[Item], batch_size: int, live_teacher, store_index, progress: bool, split: str) -> dict[str, list[dict]]:
    """Per item and model: nll_sum, tokens, and (where a teacher is known) kl_sum / kl_tokens.

    NLL_i = -sum_{j in scored(i)} log q(x_j | x_<j); KL per scored token: live teacher = full-vocabulary
    KL(p || q); store = ``metrics.topk_kl`` on the stored top-k rows.
    """
    from kdship.store import teacher_entries

    out: dict[str, list[dict]] = {n: [] for n in loaded}
    teacher_key = _tok_key(live_teacher) if live_teacher is not None else None
    for name, model in loaded.items():
        key = _tok_key(model)
        kl_live = live_teacher is not None and model is not live_teacher and key == teacher_key
        kl_store = store_index is not None and (store_index.tokenizer_sha256 in (None, key))
        if store_index is not None and not kl_store:
            log.warning("model %s: tokenizer differs from the teacher store's; no KL for it", name)
        bar = _bar(len(items), f"{split}/{name}", progress)
        for b in range(0, len(items), batch_size):
            batch = items[b : b + batch_size]
            rendered = [lm_tokens(it, model.tokenizer) for it in batch]
            seqs = [t for t, _ in rendered]
            positions = [_mask_positions(m) for _, m in rendered]
            keep = [i for i, p in enumerate(positions) if len(p)]
            if len(keep) != len(batch):
                bad = batch[next(i for i in range(len(batch)) if i not in keep)]
                raise TaskError(f"{bad.source}: no scored token after rendering (empty response?)")
            rows = model.logprob_rows(seqs, positions)
            t_rows = live_teacher.logprob_rows(seqs, positions) if kl_live else None
            for i, it in enumerate(batch):
                toks = np.asarray(seqs[i])
                pos = positions[i]
                lp = rows[i][np.arange(len(pos)), toks[pos]]
                rec: dict[str, Any] = {"nll_sum": float(-lp.astype(np.float64).sum()), "tokens": int(len(pos))}
                if kl_live:
                    kl = M.full_kl(t_rows[i], rows[i])
                    rec.update(kl_sum=float(kl.sum()), kl_tokens=int(len(pos)))
                elif kl_store:
                    s = store_index.lookup(toks)
                    if s is None:
                        rec["kl_unmatched"] = True
                    else:
                        ids, lps = teacher_entries(s)
                        ids, lps = ids[pos], lps[pos]
                        valid = (ids >= 0).any(1)
                        if valid.any():
                            if int(ids[valid].max()) >= rows[i].shape[1]:
                                raise EvalError(f"{store_index.url}: teacher ids beyond model {name}'s vocabulary ({rows[i].shape[1]})")
                            kl = M.topk_kl(ids[valid], lps[valid], rows[i][valid])
                            rec.update(kl_sum=float(kl.sum()), kl_tokens=int(valid.sum()))
                out[name].append(rec)
            bar.update(len(batch))
        bar.close()
    return out


def _run_choice(model, items: list[Item], batch_size: int, progress: bool, split: str) -> list[dict]:
    """Score every option: sum_j log q(option token j | prompt, option tokens < j)."""
    tok = model.tokenizer
    pairs = []  # (item i, option k, seq, positions)
    for i, it in enumerate(items):
        p = prompt_tokens(it, tok)
        sep = "" if it.row is not None and (it.row.prompt or "")[-1:].isspace() else " "
        for k, c in enumerate(it.choices):
            o = tok(sep + c, add_special_tokens=False)["input_ids"]
            if not o:
                raise TaskError(f"{it.source}: choice {k} tokenises to nothing")
            seq = list(p) + list(o)
            pairs.append((i, k, seq, np.arange(len(p), len(seq))))
    scores: dict[tuple[int, int], float] = {}
    bar = _bar(len(pairs), f"{split}/{model.name}", progress)
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        rows = model.logprob_rows([c[2] for c in chunk], [c[3] for c in chunk])
        for (i, k, seq, pos), r in zip(chunk, rows):
            scores[(i, k)] = float(r[np.arange(len(pos)), np.asarray(seq)[pos]].astype(np.float64).sum())
        bar.update(len(chunk))
    bar.close()
    out = []
    for i, it in enumerate(items):
        lps = [scores[(i, k)] for k in range(len(it.choices))]
        pred = M.choice_prediction(lps)
        pred_norm = M.choice_prediction(lps, [len(c) for c in it.choices])
        out.append({"option_logprobs": lps, "prediction": pred, "prediction_norm": pred_norm, "label": it.label, "correct": pred == it.label, "correct_norm": pred_norm == it.label})
    return out


def _run_generate(model, items: list[Item], task: str, batch_size: int, max_new_tokens: int, rouge_threshold: float, progress: bool, split: str) -> list[dict]:
    tok = model.tokenizer
    prompts = [prompt_tokens(it, tok) for it in items]
    texts: list[str] = []
    generated: list[list[int]] = []
    bar = _bar(len(items), f"{split}/{model.name}", progress)
    for b in range(0, len(items), batch_size):
        gens = model.generate(prompts[b : b + batch_size], max_new_tokens)
        texts.extend(tok.decode(g, skip_special_tokens=True) for g in gens)
        generated.extend(gens)
        bar.update(len(gens))
    bar.close()
    out = []
    for it, text, ids in zip(items, texts, generated):
        rep = {"repeated_4gram_share": M.repeated_ngram_share(text)}
        if task == "answer":
            ans, ref = extract_answer(text), extract_answer(it.reference)
            out.append({"generation": text, "answer": ans, "reference_answer": ref, "correct": ans is not None and ans == ref, **rep, "_ids": ids})
        else:
            rl = M.rouge_l_multi(text, it.references)
            out.append({"generation": text, "rouge_l": rl, "correct": rl["f1"] >= rouge_threshold, **rep, "_ids": ids})
    return out


def _judge_generations(teacher, loaded: dict, items: list[Item], per_model: dict[str, list[dict]], batch_size: int, progress: bool, split: str) -> None:
    """The teacher as judge of every model's free-running output: ``teacher_nll_sum`` over the
    ``generated_tokens`` (the teacher's NLL of what the model wrote, given the prompt: lower = the teacher
    would have written it too; what on-policy distillation trains for) and ``rouge_l_vs_teacher`` (ROUGE-L
    against the teacher's own greedy answer). A model with another tokenizer is re-tokenised with the
    teacher's. Adds the fields to each row in place."""
    tok = teacher.tokenizer
    prompts = [prompt_tokens(it, tok) for it in items]
    teacher_texts = [r["generation"] for r in per_model["teacher"]]
    for name, rows in per_model.items():
        same_tok = _tok_key(teacher) == _tok_key(loaded[name])
        gens = [r["_ids"] if same_tok else tok(r["generation"], add_special_tokens=False).input_ids for r in rows]
        bar = _bar(len(rows), f"{split}/{name} judged by teacher", progress)
        for b in range(0, len(rows), batch_size):
            seqs = [prompts[i] + list(gens[i]) for i in range(b, min(b + batch_size, len(rows)))]
            todo = [(i, s) for i, s in zip(range(b, b + len(seqs)), seqs) if len(gens[i])]
            lps = teacher.logprob_rows([s for _, s in todo], [np.arange(len(prompts[i]), len(s)) for i, s in todo]) if todo else []
            nll = {i: -float(lp[np.arange(len(gens[i])), np.asarray(gens[i])].sum()) for (i, _), lp in zip(todo, lps)}
            for i in range(b, b + len(seqs)):
                rows[i]["teacher_nll_sum"] = nll.get(i, 0.0)
                rows[i]["generated_tokens"] = len(gens[i])
                rows[i]["rouge_l_vs_teacher"] = M.rouge_l(rows[i]["generation"], teacher_texts[i])
            bar.update(len(seqs))
        bar.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    return v
