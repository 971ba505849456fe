"""The ``xprobe`` command line: a thin shell over the stage configs and the store."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import sys
import typing
from pathlib import Path
from typing import Any

import click

from pipeline.config import field_docs, from_dict, load_toml
from pipeline.errors import Interrupted, XprobeError
from pipeline.registry import STAGES, StageEntry
from pipeline.store import Store


def _sections(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A stage's TOML section(s): a table, or an array of tables for stages run several times."""
    section = config.get(name)
    if section is None:
        return []
    return section if isinstance(section, list) else [section]


def _store_path(config: dict[str, Any], override: str | None) -> str:
    path = override or config.get("store")
    if not path:
        raise XprobeError(
            'no store given: set store = "PATH" at the top of the config or pass --store'
        )
    return path


def _open_store(config: dict[str, Any], override: str | None, cache: tuple[str, ...]) -> Store:
    """The local store to write, with the read-only caches from ``--cache`` or ``cache = ...``."""
    caches = list(cache) or config.get("cache") or []
    if isinstance(caches, str):
        caches = [caches]
    return Store(_store_path(config, override), mode="a", cache=caches)


_CACHE_HELP = (
    "Read-only store (path or URL) to read missing inputs from (repeatable; overrides `cache`)."
)


def _unknown_sections(config: dict[str, Any]) -> None:
    known = {"store", "cache"} | {s.name for s in STAGES}
    unknown = sorted(set(config) - known)
    if unknown:
        raise XprobeError(f"unknown config section(s) {unknown}; known: {sorted(known)}")


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
@click.option(
    "--rebuild-stale",
    is_flag=True,
    help="Recompute the units whose inputs changed since they were computed (and nothing else).",
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
def run(
    config_path: str,
    store_path: str | None,
    cache: tuple[str, ...],
    only: tuple[str, ...],
    force: bool,
    rebuild_stale: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Run every stage configured in CONFIG_PATH in order, skipping finished work."""
    config = load_toml(config_path)
    _unknown_sections(config)
    store = _open_store(config, store_path, cache)
    ran = 0
    with contextlib.ExitStack() as stack:
        if workers is not None:
            if scheduler:
                raise XprobeError("give --scheduler (an existing cluster) or --workers, not both")
            from pipeline.cluster import local_cluster

            scheduler = stack.enter_context(local_cluster(workers)).scheduler_address
        for entry in STAGES:
            if only and entry.name not in only:
                continue
            cfg_cls, run_fn = (None, None)
            for i, section in enumerate(_sections(config, entry.name)):
                if cfg_cls is None:
                    cfg_cls, run_fn = entry.load()
                if scheduler and "scheduler" in {f.name for f in dataclasses.fields(cfg_cls)}:
                    section = {**section, "scheduler": scheduler}  # the flag wins over the TOML
                    section.pop("workers", None)
                where = entry.name if i == 0 else f"{entry.name}.{i}"
                cfg = from_dict(cfg_cls, section, where=where)
                summary = run_fn(cfg, store, force=force, rebuild_stale=rebuild_stale)
                _print_summary(summary)
                ran += 1
    if ran == 0:
        raise XprobeError(f"{config_path} configures no stage; add a section such as [tokenize]")


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
    if origin in (list, tuple):
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
        sections = _sections(config, entry.name)
        if sections and not 0 <= index < len(sections):
            raise XprobeError(
                f"--index {index}: {config_path} has {len(sections)} [{entry.name}] section(s)"
            )
        values = dict(sections[index]) if sections else {}
        for key, value in flags.items():
            if value is not None and value != ():
                values[key] = list(value) if isinstance(value, tuple) else value
        cfg_cls, run_fn = entry.load()
        cfg = from_dict(cfg_cls, values, where=entry.name)
        store = _open_store(config, store_path, cache)
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
    return f"{done}/{total if total is not None else '?'} chunks  {state}"


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
        click.echo(
            f"  tokenizer={info.get('tokenizer_fingerprint')}  corpus={info.get('corpus_fingerprint')}  "
            f"config={info.get('config_fingerprint')}  xprobe {info.get('xprobe_version')}  created {info.get('created')}"
        )
        for difference in info.get("tokenizer_differences") or []:
            click.echo(f"  tokenizer differs: {difference}")


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
        if e.errno != errno.ENOSPC:
            raise
        click.echo(f"error: the disk is full ({e}); free some space and rerun to resume", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _interrupted(e)


if __name__ == "__main__":
    main()
