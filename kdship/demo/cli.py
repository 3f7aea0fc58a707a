"""`kdship demo`: distil SmolLM2-135M-Instruct end to end (a thin wrapper of ``kdship.demo.pipeline.run_demo``)."""

from __future__ import annotations

from typing import Optional

import typer


def demo_command(
    out: Optional[str] = typer.Option(None, "--out", help="Folder for stores, runs, exports and the report. Default demo_out."),
    quick: Optional[bool] = typer.Option(None, "--quick/--full", help="Smaller sizes (a few minutes) instead of the default ones."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A local HF teacher directory instead of SmolLM2-135M-Instruct."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="With --teacher: training JSONL (score mode). Needs --prompts, --heldout, --ood too."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Prompts JSONL for the teacher's answers (generate mode)."),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out JSONL for eval."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Out-of-distribution JSONL for eval."),
    train_conversations: Optional[int] = typer.Option(None, "--train-conversations", help="Chats scored by the teacher. Default 200 (~27k positions)."),
    keep_layers: Optional[int] = typer.Option(None, "--keep-layers", help="Decoder layers the pruned student keeps. Default 8 (of 30)."),
    width: Optional[float] = typer.Option(None, "--width", help="Share of the teacher's width (query heads, hidden, MLP) the student keeps; 1 = depth pruning only. Default 2/3."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training passes over the store, both students. Default 2."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="The exact head of the headtail targets (kdship cache --top-k). Default 4."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate, both students. Default 5e-4."),
    force: bool = typer.Option(False, "--force", help="Redo every stage even when its inputs are unchanged."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bars. Default on."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of these options and any DemoSizes field (flags override it)."),
) -> None:
    """Distil a real pretrained LLM end to end: cache (vLLM) -> train KD and SFT students -> eval -> export -> serve -> profile.

    Stages already done are skipped on a rerun. Prints one closing table and the report folder.
    """
    import logging
    import sys
    from dataclasses import asdict, fields

    from kdship.config import ConfigError, resolve
    from kdship.demo.pipeline import QUICK, DemoSizes, run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    size_names = {f.name for f in fields(DemoSizes)}
    defaults = dict(asdict(DemoSizes()), out="demo_out", quick=False, teacher=None, train_data=None, prompts_file=None, heldout=None, ood=None, progress=True)
    flags = dict(
        out=out, quick=quick, teacher=teacher, train_data=train_data, prompts_file=prompts, heldout=heldout, ood=ood, progress=progress,
        train_conversations=train_conversations, keep_layers=keep_layers, width=width, epochs=epochs, top_k=top_k, lr=lr,
    )
    try:
        cfg = resolve(defaults, config, flags)
    except ConfigError as e:
        typer.echo(f"kdship demo: {e}", err=True)
        raise typer.Exit(2)
    # --quick swaps in the smaller sizes, except where a flag or the YAML file set one explicitly.
    explicit = {k for k, v in flags.items() if v is not None}
    if config:
        from kdship.config import load_yaml

        explicit |= set(load_yaml(config))
    sizes_kw = {k: cfg[k] for k in size_names}
    if cfg["quick"]:
        sizes_kw.update({k: v for k, v in QUICK.items() if k not in explicit})
    for k in ("perturb", "profile_concurrency"):
        sizes_kw[k] = tuple(sizes_kw[k])
    data = None
    given = {k: cfg[k] for k in ("train_data", "prompts_file", "heldout", "ood") if cfg[k]}
    if given:
        if len(given) != 4:
            typer.echo("kdship demo: --train-data, --prompts, --heldout and --ood go together (all four)", err=True)
            raise typer.Exit(2)
        data = {"train": given["train_data"], "prompts": given["prompts_file"], "heldout": given["heldout"], "ood": given["ood"]}
    try:
        res = run_demo(out=cfg["out"], teacher=cfg["teacher"], data=data, sizes=DemoSizes(**sizes_kw), force=force, progress=bool(cfg["progress"]))
    except Exception as e:  # noqa: BLE001 - one clear line, the traceback in the log above when asked
        logging.getLogger("kdship.demo").exception("demo failed")
        typer.echo(f"kdship demo: failed: {e}", err=True)
        raise typer.Exit(1)
    print_closing(res)


def print_closing(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from kdship.demo.report import _fmt

    table = Table(title="kdship demo: what distillation bought", show_lines=False)
    for col, just in (("metric", "left"), ("teacher", "right"), ("KD student", "right"), ("SFT student", "right"), ("retention KD / SFT, or speed-up", "right")):
        table.add_column(col, justify=just)
    for r in res["table"]:
        if r.get("speedup") is not None:
            last = f"{r['speedup']:.1f}{r.get('speedup_label', 'x')}"
        elif r.get("retention_kd") is not None or r.get("retention_sft") is not None:
            last = f"{_fmt(r.get('retention_kd'))} / {_fmt(r.get('retention_sft'))}"
        else:
            last = ""
        table.add_row(r["metric"], _fmt(r["teacher"]), _fmt(r["kd"]), _fmt(r["sft"]), last)
    import shutil

    console = Console(width=max(132, shutil.get_terminal_size().columns))  # one line per row, even in a log
    console.print(table)
    t = res["timings"]
    console.print("stage seconds: " + ", ".join(f"{k} {v['seconds']}{'' if v.get('status') in (None, 'ran') else ' (' + v['status'] + ')'}" for k, v in t.items()))
    for k, v in res.get("skipped", {}).items():
        console.print(f"[yellow]skipped {k}: {v}[/yellow]")
    console.print(f"report: {res['report']}/report.md")
