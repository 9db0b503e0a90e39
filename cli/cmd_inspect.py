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
            for problem in problems:
                click.echo(f"  {problem}", err=True)
            raise click.ClickException(f"{data_dir}: {len(problems)} damaged shard(s); run "
                                       f"`cp2image-tf inspect {data_dir} --verify` for details.")
        click.echo("  shards: all present, with the manifest's sizes and record counts "
                   "(--verify reads every record).")
    if verify:
        start_tensorflow()
        problems = call(lib.verify, data_dir)
        if problems:
            for problem in problems:
                click.echo(f"  {problem}", err=True)
            raise click.ClickException(f"{data_dir}: verification failed ({len(problems)} problem(s)).")
        click.echo("  verify: every shard matches its checksum and every record parses; "
                   "counts agree with the manifest.")
