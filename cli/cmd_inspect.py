"""The inspect command: a dataset's summary, and --verify."""
import click

from cli.common import call, start_tensorflow


@click.command()
@click.argument("data_dir", type=click.Path())
@click.option("--verify", is_flag=True,
              help="Read every record and check checksums and counts against the manifest.")
def inspect(data_dir, verify):
    """Summarise a converted dataset; --verify checks every shard and record."""
    from tfrecords_tools import inspection as lib

    click.echo(call(lib.summarize, data_dir))
    if not verify:
        problems = call(lib.quick_check, data_dir)
        if problems:
            fail(problems, f"Run `cp2image-tf inspect {data_dir} --verify` for every "
                           "record, and convert the data again.")
        click.echo("  shards: all present, with the manifest's sizes and record counts "
                   "(--verify reads every record).")
    if verify:
        start_tensorflow()
        problems = call(lib.verify, data_dir)
        if problems:
            fail(problems, "Convert the data again (or restore the named files).")
        click.echo("  verify: every shard matches its checksum and every record parses; "
                   "counts agree with the manifest.")


def fail(problems, advice):
    """The problems after the first on their own lines, then one error line with the first."""
    for problem in problems[1:]:
        click.echo(f"  {problem}", err=True)
    more = f" (and {len(problems) - 1} more problem(s), above)" if len(problems) > 1 else ""
    raise click.ClickException(f"{problems[0]}{more}. {advice}")
