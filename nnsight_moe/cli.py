"""The ``nnsight-moe`` command line: ``families``, ``inspect``, ``check`` (routing fidelity), ``run`` (the main job)
and ``steer`` (behaviour-linked experts, steered against random experts)."""

from __future__ import annotations

import click

from nnsight_moe.models import DTYPES  # torch-free, like everything this module imports at start

DEFAULT_MODEL = "demo-moe"


class _BatchSize(click.ParamType):
    """A positive integer, or ``auto`` (the memory planner chooses)."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)
        return number


class _Memory(click.ParamType):
    """A memory size such as ``8GiB`` or ``500MB`` (:func:`nnsight_moe.memory.parse_size`), kept as bytes."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from nnsight_moe.memory import parse_size  # torch-free

        try:
            return parse_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


BATCH_SIZE, MEMORY = _BatchSize(), _Memory()


def _remote(value: str | None):
    """``--remote``: none (local), ``ndif`` (True), ``local`` (nnsight's simulation) or a host URL."""
    if value is None:
        return None
    return {"ndif": True, "true": True, "local": "local"}.get(value.lower(), value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnsight-moe")
def main() -> None:
    """MoE interpretability for TransformerLens and nnsight users."""


@main.command()
@click.option("--markdown", is_flag=True, help="A markdown table with each family's routing and shared experts.")
@click.option("--coverage", "show_coverage", is_flag=True,
              help="Markdown tables of the installed transformers' MoE packages: served by another family, "
                   "not yet supported, excluded (with reasons).")
def families(markdown: bool, show_coverage: bool) -> None:
    """List the supported MoE families (HF model_type values)."""
    import nnsight_moe

    if show_coverage:
        _coverage_tables()
        return
    if not markdown:
        for name in nnsight_moe.supported_families():
            click.echo(name)
        return
    from nnsight_moe.adapters import family_table

    click.echo("| family | routing | shared experts |\n|---|---|---|")
    for name, routing, shared in family_table():
        click.echo(f"| {name} | {routing} | {shared} |")


def _coverage_tables() -> None:
    """Markdown tables of :func:`nnsight_moe.coverage.coverage` (all but the supported families' own packages)."""
    from nnsight_moe.coverage import coverage

    rows = coverage()
    count = {status: sum(s == status for _, s, _ in rows) for status in ("supported", "not yet", "excluded", "unlisted")}
    click.echo(f"{len(rows)} MoE packages in the installed transformers: {count['supported']} supported, "
               f"{count['not yet']} not yet, {count['excluded']} excluded, {count['unlisted']} unlisted.\n")
    for title, header, body in (
        ("Served by another family's adapter", "| package | family |",
         [(p, d) for p, s, d in rows if s == "supported" and p != d]),
        ("Not yet supported", "| package | what it needs |", [(p, d) for p, s, d in rows if s == "not yet"]),
        ("Excluded (not a causal-LM MoE)", "| package | why |", [(p, d) for p, s, d in rows if s == "excluded"]),
        ("Unlisted (add to nnsight_moe.coverage)", "| package | found |", [(p, d) for p, s, d in rows if s == "unlisted"]),
    ):
        if body:
            click.echo(f"{title}:\n\n{header}\n|---|---|")
            for package, detail in body:
                click.echo(f"| {package} | {detail} |")
            click.echo()


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="demo-moe, demo-dense, a local model directory, or a hub name.")
def inspect(model: str) -> None:
    """Show the MoE layout of a model and its hook names."""
    import nnsight_moe
    from nnsight_moe.models import load_model

    lm, _ = _or_fail(lambda: load_model(model))
    try:
        layout = nnsight_moe.layout(lm)
    except nnsight_moe.UnsupportedModelError as err:
        raise click.ClickException(str(err)) from err
    click.echo(str(layout))
    first = layout.layer(layout.moe_layers[0])
    click.echo("\nhook points per MoE layer (HF/nnsight: <block path>.<name>, TransformerLens: blocks.{L}.mlp.<name>):")
    for name in first.hook_names:
        click.echo(f"  {first.path}.{name}")


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="demo-moe, demo-dense, a local model directory, or a hub name.")
@click.option("--data", "-d", default=None, help="LRE relation JSON file or directory [default: bundled relations].")
@click.option("--out", "-o", default="results", show_default=True, help="Output directory.")
@click.option("--remote", default=None, help="Run through nnsight remotely: 'ndif', 'local' (simulation) or a host URL.")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda.")
@click.option("--dtype", default=None, type=click.Choice(DTYPES))
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch CPU threads [default: $NNSIGHT_MOE_THREADS, else 1 for small models like the demos].")
@click.option("--batch-size", default="auto", show_default=True, type=BATCH_SIZE,
              help="Prompts per forward, or 'auto': the largest batch that fits --max-memory.")
@click.option("--max-memory", default=None, type=MEMORY,
              help="Working memory the job may use on top of the model, e.g. 8GiB or 500MB "
                   "[default: the device's free memory minus a margin].")
@click.option("--per-relation", default=24, show_default=True, type=click.IntRange(min=0),
              help="Prompts per relation for the recipes (0 = all facts); the baseline uses every fact.")
@click.option("--quick", is_flag=True, help="8 prompts per relation and fewer seeds (smoke runs).")
@click.option("--target", default="gold", show_default=True, type=click.Choice(["gold", "prediction"]),
              help="What the recipes score: the gold object's first token, or the model's own top-1 prediction.")
@click.option("--only-correct", is_flag=True, help="Run the recipes only on facts the model answers correctly.")
@click.option("--fresh", is_flag=True,
              help="Discard the finished work an interrupted run kept in --out, and start over (default: resume).")
@click.option("--dense", default=None, multiple=True,
              help="A dense model (name or directory, as --model) for the MoE-vs-dense attribution comparison; "
                   "repeat it or separate names by commas for several (e.g. two depths), 'none' for no comparison "
                   "[default: demo-dense for demo-moe, faithful-dense and faithful-dense-12 for faithful-moe, "
                   "else none].")
@click.option("--in-sample", is_flag=True,
              help="Blocking: rank experts and evaluate on the same facts (default: rank on half of each "
                   "relation's subjects, evaluate on the other half).")
@click.option("--allow-http", is_flag=True,
              help="Allow --remote http://HOST to a host other than this machine (the API key travels unencrypted).")
def run(model, data, out, remote, device, dtype, threads, batch_size, max_memory, per_relation, quick, target,
        only_correct, fresh, dense, in_sample, allow_http) -> None:
    """Run the main job: every recipe on a model and relations; writes results.json and report.html."""
    from nnsight_moe.models import check_model_name

    if remote is not None:  # a plain-http host is refused before anything else (the API key would leak)
        from nnsight_moe.remote import ALLOW_HTTP_ENV, _check_remote

        if allow_http:
            import os

            os.environ[ALLOW_HTTP_ENV] = "1"
        _or_fail(lambda: _check_remote(_remote(remote)))
    _or_fail(lambda: check_model_name(model))  # before torch is imported: a bad name fails at once
    dense = list(dense) or None  # not given: the model's default comparison (run_job)
    if dense is not None:
        from nnsight_moe.models import dense_models

        for name in _or_fail(lambda: dense_models(model, dense)):
            _or_fail(lambda: check_model_name(name))
    from nnsight_moe.job import check_out_dir, run_job

    _or_fail(lambda: check_out_dir(out))
    _or_fail(lambda: run_job(model, data, out, remote=_remote(remote), device=device, dtype=dtype,
                             batch_size=batch_size, quick=quick, max_per_relation=per_relation,
                             target=target, only_correct=only_correct, fresh=fresh, threads=threads,
                             split=not in_sample, dense=dense, max_memory=max_memory))


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="demo-moe, a local model directory, or a hub name.")
@click.option("--dtype", default=None, type=click.Choice(DTYPES),
              help="dtype to check the model in [default: the checkpoint's].")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda.")
@click.option("--no-float32", is_flag=True, help="Skip the float32 comparison (it needs a float32 copy of the model).")
def check(model, dtype, device, no_float32) -> None:
    """Check the hooks on a model: per MoE layer, attached vs unattached output, the decomposition
    identities and top-k flips across dtypes and experts implementations. Exit code 1 when an identity fails."""
    import nnsight_moe
    from nnsight_moe.check import check_routing
    from nnsight_moe.models import load_model

    lm, tokenizer = _or_fail(lambda: load_model(model, device=device, dtype=dtype))
    try:
        report = check_routing(lm, tokenizer=tokenizer, compare_float32=not no_float32)
    except (nnsight_moe.UnsupportedModelError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(report.format())
    if not report.ok:
        raise SystemExit(1)


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="demo-moe, a local model directory, or a hub name.")
@click.option("--data", "-d", default=None, help="LRE relation JSON file or directory [default: bundled relations].")
@click.option("--behaviour", "-b", default="country_capital_city", show_default=True,
              help="Relation whose experts are found and steered.")
@click.option("--control", "-c", default="country_language", show_default=True, help="Relation it is contrasted with.")
@click.option("--goal", default="both", show_default=True, type=click.Choice(["toward", "suppress", "both"]),
              help="toward: force the experts ON in control prompts, scored on the behaviour answer of the same "
                   "subject; suppress: force them OFF in behaviour prompts.")
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1), help="Experts steered.")
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Draws of layer-matched random experts (the baseline).")
@click.option("--margin", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Forced logit = max + margin (on) or min - margin (off).")
@click.option("--per-relation", default=0, show_default=True, type=click.IntRange(min=0),
              help="Facts per relation before the discovery / held-out split (0 = all).")
@click.option("--remote", default=None, help="Run through nnsight remotely: 'ndif', 'local' (simulation) or a host URL.")
@click.option("--allow-http", is_flag=True, help="Allow --remote http://HOST to a host other than this machine.")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda.")
@click.option("--dtype", default=None, type=click.Choice(DTYPES))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--out", "-o", default=None, help="Write the discovery and evaluations to this JSON file.")
def steer(model, data, behaviour, control, goal, top, seeds, margin, per_relation, remote, allow_http, device, dtype,
          threads, batch_size, out) -> None:
    """Find the experts linked to one relation (vs another) and steer with them on held-out prompts, against
    layer-matched random experts (docs/recipes/steering.md)."""
    from nnsight_moe.models import check_model_name

    if remote is not None:
        from nnsight_moe.remote import ALLOW_HTTP_ENV, _check_remote

        if allow_http:
            import os

            os.environ[ALLOW_HTTP_ENV] = "1"
        _or_fail(lambda: _check_remote(_remote(remote)))
    _or_fail(lambda: check_model_name(model))
    from nnsight_moe.recipes.steering import run_steer

    goals = ("toward", "suppress") if goal == "both" else (goal,)
    _or_fail(lambda: run_steer(model, data, behaviour=behaviour, control=control, goals=goals, top=top, seeds=seeds,
                               margin=margin, per_relation=per_relation, remote=_remote(remote), device=device,
                               dtype=dtype, threads=threads, batch_size=batch_size, out=out))
#: ``nnsight-moe analyze NAME``: the analysis recipes' own command lines (``python -m nnsight_moe.recipes.<module>``)
ANALYSES = {"routing": "routing_stats", "specialisation": "specialisation", "fidelity": "fidelity", "lenses": "lenses",
            "super-experts": "super_experts", "replot": "replot"}


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("name", type=click.Choice(sorted(ANALYSES)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def analyze(name, args) -> None:
    """Run one analysis recipe: routing, specialisation, fidelity, lenses, super-experts, replot (ARGS: its
    own options, see `nnsight-moe analyze NAME --help`)."""
    import importlib

    _or_fail(lambda: importlib.import_module(f"nnsight_moe.recipes.{ANALYSES[name]}").main(list(args)))


def _or_fail(fn):
    """Turn the library's input errors into a one-line CLI error (exit code 1)."""
    from nnsight_moe.data import RelationFormatError

    try:
        return fn()
    except (ValueError, PermissionError, FileNotFoundError, RelationFormatError) as err:
        raise click.ClickException(str(err)) from err


if __name__ == "__main__":
    main()
