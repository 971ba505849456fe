"""The ``xprobe`` command line: a thin shell over the stage configs and the store."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import shutil
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from pipeline.api import plan, run_planned, stage_sections, store_location, write_floors
from pipeline.config import field_docs, from_dict, is_list_field, load_toml, parse_flag, relative_to
from pipeline.errors import Interrupted, XprobeError
from pipeline.quiet import quiet
from pipeline.registry import STAGES, StageEntry
from pipeline.store import Store


def _config_dir(config_path: str | None) -> Path | None:
    """The folder relative paths in a TOML file are relative to: the file's own."""
    return Path(config_path).parent if config_path else None


def _store_path(config: dict[str, Any], override: str | None, base: Path | None) -> str:
    if override:
        return override
    path = config.get("store")
    if not path:
        raise XprobeError(
            'no store given: set store = "PATH" at the top of the config or pass --store'
        )
    return store_location(path, base)


def _caches(config: dict[str, Any], cache: tuple[str, ...], base: Path | None) -> list[str]:
    """The read-only caches from ``--cache`` or the config's ``cache = ...``."""
    if cache:
        return list(cache)
    caches = config.get("cache") or []
    return [store_location(c, base) for c in ([caches] if isinstance(caches, str) else caches)]


@contextlib.contextmanager
def _new_store_removed_on_failure(path: str) -> Iterator[None]:
    """If the command fails before any chunk is recorded, remove the store folder it created (and
    the parent folders it created for it), so a mistyped config leaves nothing behind."""
    created = None
    if "://" not in path and not path.endswith(".zip"):
        candidate = Path(path).absolute()
        while not candidate.exists() and candidate != candidate.parent:
            created, candidate = candidate, candidate.parent
    try:
        yield
    except BaseException:
        if created is not None and created.exists() and not _worth_keeping(Path(path)):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _worth_keeping(path: Path) -> bool:
    """Whether a store folder holds a recorded chunk, or a lock of another run (this run's locks
    are released by now) that may be about to write one."""
    if not path.exists():
        return False
    if any(not p.name.startswith(".") for p in path.rglob("*.lock")):
        return True
    try:
        store = Store(path, mode="r")
        return any(store.done_chunks(unit) for unit, _ in store.units())
    except XprobeError:  # not (yet) a store: nothing in it to keep
        return False


_CACHE_HELP = (
    "Read-only store (path or URL) to read missing inputs from (repeatable; overrides `cache`)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="xprobe")
def cli() -> None:
    """xprobe: which SAE features of model A does model B have, and what is B's direction for each?"""


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--store", "store_path", help="Store path (overrides `store` in the config).")
@click.option("--cache", multiple=True, help=_CACHE_HELP)
@click.option("--only", multiple=True, help="Run only these stages (repeatable).")
@click.option("--force", is_flag=True, help="Start the selected stages' outputs over.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in batch job logs).")
@click.option(
    "--rebuild-stale",
    is_flag=True,
    help="Recompute the units whose inputs changed since they were computed (and nothing else).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what each stage would do with each unit (complete, stale, to do) and do nothing.",
)
@click.option(
    "--scheduler",
    help="Run activations, features and fit on this dask cluster (address or scheduler file).",
)
@click.option(
    "--workers",
    type=int,
    help="Start one local dask cluster of N worker processes for the run (one per GPU where "
    "CUDA is visible; 0 = every GPU).",
)
@click.option(
    "--max-disk",
    help="Disk budget for the store, e.g. 50GB: go over the corpus in segments that fit it, "
    "evicting each segment's dense activations once every stage has consumed them (also "
    'max_disk = "50GB" in the config).',
)
def run(
    config_path: str,
    store_path: str | None,
    cache: tuple[str, ...],
    only: tuple[str, ...],
    force: bool,
    no_progress: bool,
    rebuild_stale: bool,
    dry_run: bool,
    scheduler: str | None,
    workers: int | None,
    max_disk: str | None,
) -> None:
    """Run every stage configured in CONFIG_PATH in order, skipping finished work.

    Relative paths in CONFIG_PATH are relative to its folder. Every section is checked before
    anything runs.
    """
    config = load_toml(config_path)
    if workers is not None and scheduler:
        raise XprobeError("give --scheduler (an existing cluster) or --workers, not both")
    base = _config_dir(config_path)
    path = _store_path(config, store_path, base)
    overrides: dict[str, Any] = {"progress": False} if no_progress else {}
    if scheduler or workers is not None:
        overrides["scheduler"] = scheduler  # the flags win over the TOML
    # every section checked before any runs; the ceiling and floor derived (pipeline.controls)
    planned = plan(config, base, only, overrides, path)
    max_disk = max_disk or config.get("max_disk")
    if max_disk is not None:
        from pipeline.segments import parse_size

        parse_size(max_disk)  # a bad size is refused before anything runs
    if not planned:
        raise XprobeError(f"{config_path} configures no stage; add a section such as [tokenize]")
    if dry_run:
        _dry_run(planned, path, _caches(config, cache, base))
        return
    with _new_store_removed_on_failure(path), contextlib.ExitStack() as stack:
        stack.enter_context(quiet(not no_progress))
        write_floors(config, base, path)
        store = Store(path, mode="a", cache=_caches(config, cache, base))
        if workers is not None:
            from pipeline.cluster import local_cluster

            address = stack.enter_context(local_cluster(workers)).scheduler_address
            planned = [
                (
                    entry,
                    dataclasses.replace(cfg, scheduler=address)
                    if hasattr(cfg, "scheduler")
                    else cfg,
                    fn,
                )
                for entry, cfg, fn in planned
            ]
        for summary in run_planned(
            planned, store, max_disk, force, rebuild_stale, progress=not no_progress
        ):
            _print_summary(summary)


_PLAN_WORDS = {
    "complete": "complete",
    "new": "to do",
    "resume": "to resume",
    "restart": "to redo (nothing committed yet, or a cache of other settings)",
}


def _dry_run(planned: list[tuple[StageEntry, Any, Any]], path: str, caches: list[str]) -> None:
    """``run --dry-run``: each configured unit's state, as the lifecycle assesses it now. A stage
    whose inputs are not complete yet is shown as waiting for them (an earlier stage makes them)."""
    from pipeline.lifecycle import plan as assess
    from pipeline.lifecycle import refusal

    store = None  # a store not created yet: everything is to do
    if "://" in path or Path(path).exists():
        store = Store(path, mode="r", cache=caches)
    for entry, cfg, _ in planned:
        stage = entry.load_stage()(cfg)
        if store is None:
            for unit in _new_units(stage):
                click.echo(f"{entry.name:<12} {unit + ' (new store)':<60} to do")
            continue
        try:
            states = assess(stage, store)
        except XprobeError as e:
            click.echo(f"{entry.name:<12} {'':<60} waits: {str(e).splitlines()[0]}")
            continue
        for a in states:
            if a.state in ("stale", "config"):
                words = str(refusal(stage, a)).split(". Recompute")[0].split("\nUse")[0]
                words = words.replace(f"{a.unit} ", "", 1).replace("\n ", ";")
            else:
                words = _PLAN_WORDS[a.state]
            click.echo(f"{entry.name:<12} {a.unit:<60} {words}")


def _new_units(stage: Any) -> list[str]:
    """The units a stage would write to a store that does not exist yet, from its config alone
    (an activations stage reads its model's config for the layers); "" if it cannot say."""
    try:
        if hasattr(stage, "wanted") and hasattr(stage, "unit_of"):
            return [stage.unit_of(layer, kind) for layer, kind in stage.wanted()] or [""]
        if isinstance(getattr(stage, "unit", None), str):
            return [stage.unit]
        from pipeline.store.layout import probes_unit, report_unit

        named = {"fit": probes_unit, "report": report_unit}.get(stage.name)
        if named is not None:
            return [named(stage.cfg.name)]
    except XprobeError:
        pass
    return [""]


def _print_summary(summary: dict[str, Any]) -> None:
    if summary.get("message"):  # a stage that prints its own summary (the report)
        click.echo(summary["message"])
    elif summary.get("cache"):
        click.echo(
            f"{summary['stage']}: already complete in the cache {summary['cache']} ({', '.join(summary['units'])})"
        )
    elif summary.get("already_complete"):
        click.echo(f"{summary['stage']}: already complete ({', '.join(summary['units'])})")
    else:
        click.echo(
            f"{summary['stage']}: wrote {summary['chunks_written']} chunk(s) to {', '.join(summary['units'])}"
        )


def _option_for(field: dataclasses.Field, hint: Any, doc: str) -> click.Option:
    flag = "--" + field.name.replace("_", "-")
    doc = field.metadata.get("doc") or doc
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        hint, origin, args = args[0], typing.get_origin(args[0]), list(typing.get_args(args[0]))
    if hint is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", field.name], default=None, help=doc)
    if is_list_field(hint):
        return click.Option(
            [flag, field.name], multiple=True, default=None, help=doc or "repeatable"
        )
    if origin is typing.Literal:
        return click.Option(
            [flag, field.name], type=click.Choice([str(a) for a in args]), default=None, help=doc
        )
    ptype = {int: int, float: float}.get(hint, str)
    return click.Option([flag, field.name], type=ptype, default=None, help=doc)


def _stage_command(entry: StageEntry) -> click.Command:
    """``xprobe <stage>``: run one stage from a TOML section and/or flags."""

    def callback(
        config_path: str | None,
        store_path: str | None,
        cache: tuple[str, ...],
        force: bool,
        rebuild_stale: bool,
        index: int,
        **flags: Any,
    ) -> None:
        config = load_toml(config_path) if config_path else {}
        base = _config_dir(config_path)
        sections = stage_sections(config, entry.name)
        if sections and not 0 <= index < len(sections):
            raise XprobeError(
                f"--index {index}: {config_path} has {len(sections)} [{entry.name}] section(s)"
            )
        cfg_cls, run_fn = entry.load()
        values = relative_to(cfg_cls, dict(sections[index]), base) if sections else {}
        hints = typing.get_type_hints(cfg_cls)
        for key, value in flags.items():  # flags: paths relative to the working directory
            if value is None or value == ():
                continue
            if is_list_field(hints[key]):
                value = parse_flag(hints[key], value, "--" + key.replace("_", "-"))
            values[key] = value
        cfg = from_dict(cfg_cls, values, where=entry.name)
        path = _store_path(config, store_path, base)
        with _new_store_removed_on_failure(path), quiet(getattr(cfg, "progress", True)):
            store = Store(path, mode="a", cache=_caches(config, cache, base))
            _print_summary(run_fn(cfg, store, force=force, rebuild_stale=rebuild_stale))

    params: list[click.Parameter] = [
        click.Option(
            ["--config", "config_path"],
            type=click.Path(dir_okay=False),
            help="TOML config to read.",
        ),
        click.Option(
            ["--store", "store_path"], help="Store path (overrides `store` in the config)."
        ),
        click.Option(["--cache"], multiple=True, help=_CACHE_HELP),
        click.Option(["--force"], is_flag=True, help="Delete this stage's outputs and start over."),
        click.Option(
            ["--rebuild-stale"],
            is_flag=True,
            help="Recompute this stage's outputs if their inputs changed since they were computed.",
        ),
        click.Option(
            ["--index"], type=int, default=0, help="Which section, if the config has several."
        ),
    ]

    class LazyCommand(click.Command):
        def get_params(self, ctx: click.Context) -> list[click.Parameter]:
            if not getattr(self, "_loaded", False):
                cfg_cls, _ = entry.load()
                hints, docs = typing.get_type_hints(cfg_cls), field_docs(cfg_cls)
                self.params.extend(
                    _option_for(f, hints[f.name], docs.get(f.name, ""))
                    for f in dataclasses.fields(cfg_cls)
                )
                self._loaded = True
            return super().get_params(ctx)

    return LazyCommand(
        entry.name, params=params, callback=callback, help=entry.help + " Flags override the TOML."
    )


for _entry in STAGES:
    cli.add_command(_stage_command(_entry))


def _progress_of(store: Store, unit: str, info: dict[str, Any]) -> str:
    done = len(store.done_chunks(unit))
    total = info.get("n_chunks") or info.get("n_chunks_planned")
    state = "complete" if info.get("complete") else "incomplete"
    evicted = len(store.evicted_chunks(unit)) if unit.startswith("acts/") else 0
    gone = f" ({evicted} consumed and evicted)" if evicted else ""
    return f"{done}/{total if total is not None else '?'} chunks  {state}{gone}"


@cli.command()
@click.argument("store_path")
def status(store_path: str) -> None:
    """Show each unit's chunk progress in STORE_PATH, and which are stale (inputs changed)."""
    from pipeline.lineage import staleness

    store = Store(store_path, mode="r")
    rows = list(store.units())
    if not rows:
        click.echo(f"{store_path}: empty store")
    memo: dict = {}
    for unit, info in rows:
        line = f"{info.get('stage', '?'):<12} {unit:<60} {_progress_of(store, unit, info)}"
        if (stale := staleness(store, unit, memo=memo)) is not None:
            line += f"  STALE: {stale.reason()}"
        click.echo(line)


_INFO_KEYS = (
    "corpus",
    "model",
    "revision",
    "hook",
    "layer",
    "sae",
    "dtype",
    "d_model",
    "n_feat",
    "n_tok",
    "n_counted",
    "n_docs",
    "n_seq",
    "ctx",
)


@cli.command()
@click.argument("store_path")
@click.option("--json", "as_json", is_flag=True, help="Print the full provenance as JSON.")
def info(store_path: str, as_json: bool) -> None:
    """What a cache holds: corpora, models, layers, SAEs, tokens, bytes, provenance."""
    store = Store(store_path, mode="r")
    units = list(store.units())
    if as_json:
        out = {unit: {**info, "bytes": store.nbytes_stored(unit)} for unit, info in units}
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    click.echo(f"store {store.url}  ({_human(store.nbytes_stored())} on disk)")
    for unit, info in units:
        click.echo(
            f"\n{unit}  [{info.get('stage')}]  {_progress_of(store, unit, info)}  {_human(store.nbytes_stored(unit))}"
        )
        facts = [f"{k}={info[k]}" for k in _INFO_KEYS if info.get(k) is not None]
        if facts:
            click.echo("  " + "  ".join(facts))
        if info.get("n_counted") is not None:
            docs = f" from {info['n_docs']:,} documents" if info.get("n_docs") else ""
            click.echo(
                f"  {info['n_counted']:,} tokens that count (no BOS, no padding) of "
                f"{info.get('n_tok', 0):,} positions{docs}"
            )
        click.echo(
            f"  tokenizer={info.get('tokenizer_fingerprint')}  corpus={info.get('corpus_fingerprint')}  "
            f"config={info.get('config_fingerprint')}  xprobe {info.get('xprobe_version')}  created {info.get('created')}"
        )
        for difference in info.get("tokenizer_differences") or []:
            click.echo(f"  tokenizer differs: {difference}")
        if info.get("norms"):
            from pipeline.maths.norms import describe

            click.echo(f"  residual norms: {describe(info['norms'])}")


@cli.command()
@click.argument("store_path")
@click.option("--repair", is_flag=True, help="Drop bad chunks' markers so a rerun recomputes them.")
def verify(store_path: str, repair: bool) -> None:
    """Check every recorded chunk of STORE_PATH against its crc32 (and activations for nan/inf)."""
    from pipeline.store.verify import verify_store

    store = Store(store_path, mode="a" if repair else "r")
    problems = verify_store(store, repair=repair)
    for p in problems:
        where = f"chunk {p.chunk}" if p.chunk is not None else "array"
        click.echo(f"{p.unit}  {where}  {p.array or '-'}: {p.what}")
    if not problems:
        click.echo(f"{store_path}: every recorded chunk and array matches its checksum")
        return
    units = sorted({p.unit for p in problems})
    if repair:
        click.echo(
            f"dropped {len(problems)} bad chunk marker(s); rerun the stages that wrote "
            f"{', '.join(units)} to recompute them"
        )
    else:
        raise XprobeError(
            f"{len(problems)} bad chunk(s) in {', '.join(units)}; run `xprobe verify {store_path} "
            "--repair`, then rerun the stages that wrote them"
        )


@cli.command()
@click.argument("store_path")
@click.argument("out", type=click.Path(dir_okay=False))
def pack(store_path: str, out: str) -> None:
    """Pack STORE_PATH into one zip file OUT to share (opens read-only: `xprobe info OUT`)."""
    path = Store(store_path, mode="a").pack(out)
    click.echo(f"wrote {path} ({_human(path.stat().st_size)})")


@cli.command()
@click.argument("store_path")
@click.option("--fit", "fit", required=True, help="Fit to export (probes/<fit>).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--hook", help="B's hook (needed when the fit probes several).")
@click.option(
    "--report", help="Report whose classes (or scores) pick the features (default: the one)."
)
@click.option(
    "--present-at",
    type=float,
    help="Keep features by presence point score >= X instead of the report's class 'present'.",
)
@click.option("--min-r2", type=float, help="Keep ok probes by held-out R² instead of presence.")
@click.option(
    "--decoder",
    type=click.Choice(["lstsq", "write"]),
    default="lstsq",
    show_default=True,
    help="Decoder: the joint least-squares fit of B's x on the encoding, or B's write "
    "directions as rows (one feature's slope each; they do not add up to a reconstruction).",
)
@click.option(
    "--train-tokens", default=100_000, show_default=True, help="Train tokens to fit the decoder on."
)
@click.option(
    "--eval-tokens",
    default=20_000,
    show_default=True,
    help="Held-out tokens to measure on (0: do not measure).",
)
@click.option(
    "--causal",
    default=0,
    show_default=True,
    help="Causal agreement of the N most present features and N others (0: skip).",
)
@click.option("--causal-contexts", default=8, show_default=True, help="Contexts per feature.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an earlier export in --out; with --causal, also start over a causal table "
    "recorded with other settings or from an earlier fit.",
)
def export(
    store_path: str,
    fit: str,
    out: str,
    hook: str | None,
    report: str | None,
    present_at: float | None,
    min_r2: float | None,
    decoder: str,
    train_tokens: int,
    eval_tokens: int,
    causal: int,
    causal_contexts: int,
    device: str,
    force: bool,
) -> None:
    """Export a fit as an SAE on B's hook that sae-lens loads (with steering vectors) and measure
    it on B's held-out tokens beside A's SAE applied directly to B."""
    from pipeline.export.run import export_fit

    # with --causal, a local store folder is opened to record the table for the report
    writable = causal > 0 and "://" not in store_path and Path(store_path).is_dir()
    summary = export_fit(
        Store(store_path, mode="a" if writable else "r"),
        fit,
        Path(out),
        hook=hook,
        report=report,
        present_at=present_at,
        min_r2=min_r2,
        decoder=decoder,
        train_tokens=train_tokens,
        eval_tokens=eval_tokens or None,
        causal=causal,
        causal_contexts=causal_contexts,
        device=device,
        force=force,
    )
    click.echo("\n".join(summary["lines"]))


@cli.command()
@click.option(
    "--path", "root", default="xprobe-demo", show_default=True, help="Where the demo writes."
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, exists=True),
    help="Demo models to use (default: the ones shipped in pipeline/demo/data).",
)
@click.option("--max-tokens", default=250_000, show_default=True, help="Corpus size in tokens.")
def demo(root: str, data: str | None, max_tokens: int) -> None:
    """Run the whole pipeline on small models shipped with xprobe (offline) and print what it finds."""
    import time

    from pipeline.demo.run import DEMO_DATA, format_numbers, run_demo

    start = time.time()
    data_dir = Path(data) if data else DEMO_DATA
    result = run_demo(Path(root), data_dir, max_tokens=max_tokens, on_summary=_print_summary)
    click.echo(format_numbers(result.numbers, data_dir))
    click.echo(f"\nconfig: {Path(root) / 'xprobe.toml'} (rerun with `xprobe run`)")
    if result.report_html:
        html = Path(result.report_html).resolve()
        shown = html.relative_to(Path.cwd()) if html.is_relative_to(Path.cwd()) else html
        click.echo(f"report: {shown}")
    click.echo(f"done in {time.time() - start:.0f} s")


def _human(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _raise_interrupted(signum: int, frame: Any) -> None:
    import signal

    raise Interrupted(signal.Signals(signum).name)


def _interrupted(e: BaseException) -> None:
    """One line for Ctrl-C or a termination signal, then the shell's exit status (128 + N)."""
    import signal

    name = e.signal_name if isinstance(e, Interrupted) else "SIGINT"
    where = "Ctrl-C" if name == "SIGINT" else name
    click.echo(
        f"interrupted ({where}): completed chunks and checkpoints are kept and the locks released; "
        "run the same command again to resume",
        err=True,
    )
    sys.exit(128 + int(getattr(signal, name)))


def main() -> None:
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupted)
    try:
        cli.main(standalone_mode=False)
    except XprobeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt into Abort
        if isinstance(e.__cause__, KeyboardInterrupt):
            _interrupted(e.__cause__)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            click.echo(
                f"error: the disk is full ({e}); free some space and rerun to resume", err=True
            )
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            where = f" {e.filename}" if e.filename else ""
            click.echo(
                f"error: cannot write{where} ({e.strerror}): the store or folder is read-only; "
                "write to a local store that reads it as a cache (`--store NEW --cache STORE`)",
                err=True,
            )
        else:
            raise
        sys.exit(2)
    except KeyboardInterrupt as e:
        _interrupted(e)


if __name__ == "__main__":
    main()
