"""``dpfl config show``: every config key with its value, default, allowed range and meaning."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dpfl.cli.common import ConfigOption, JsonOption, SetOption, console
from dpfl.cli.main import app
from dpfl.errors import ConfigError
from dpfl.jsonutil import dumps

config_app = typer.Typer(
    help="Inspect the configuration: every key, its default, range and meaning.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@config_app.command("show")
def show(
    section: Annotated[
        str | None, typer.Argument(help="Only this section (privacy, optimizer, data, ...).")
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    defaults: Annotated[
        bool, typer.Option("--defaults", help="Only the defaults (no value column).")
    ] = False,
    simulate: Annotated[
        bool,
        typer.Option(
            "--simulate",
            help="Values of dpfl simulate's embedded default (MNIST-5k, 10 clients) as the base.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Lists each key (section.key, as --set and TOML files spell it) with the value the
    given --config / --set give it, its default, the allowed values and a one-line meaning."""
    from dpfl.config import describe_fields, load_config
    from dpfl.optim.defaults import DEFAULT_LR

    if defaults and (config is not None or overrides or simulate):
        raise ConfigError("--defaults lists the defaults only: drop --config/--set/--simulate")
    base = config
    if base is None and simulate:
        from dpfl.cli.simulate import DEFAULT_CONFIG

        base = DEFAULT_CONFIG
    cfg = load_config(base, overrides or [])
    flat = cfg.to_flat()
    rows = describe_fields()
    sections = sorted({r["key"].split(".")[0] for r in rows if "." in r["key"]})
    if section is not None:
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(sections)}")
        rows = [r for r in rows if r["key"].startswith(section + ".")]
    for r in rows:
        r["value"] = flat.get(r["key"])
        if r["key"] == "optimizer.lr":
            dp, plain = DEFAULT_LR[cfg.optimizer.name]
            r["solver_default"] = {"dp": dp, "non_private": plain}
    if as_json:
        console.print(dumps({r["key"]: r for r in rows}), markup=False)
        return
    from rich.table import Table

    table = Table(title="dpfl configuration (set with --set section.key=value or a TOML file)")
    table.add_column("key", no_wrap=True)
    if not defaults:
        table.add_column("value")
    table.add_column("default")
    table.add_column("allowed")
    table.add_column("meaning")
    for r in rows:
        default = _shown(r["default"])
        if r["key"] == "optimizer.lr":
            sd = r["solver_default"]
            default = f"{cfg.optimizer.name}: {sd['dp']:g} (DP) / {sd['non_private']:g} (no DP)"
        cells = [r["key"]] + ([] if defaults else [_shown(r["value"])])
        table.add_row(*cells, default, r["allowed"], r["doc"])
    console.print(table)
