"""The explore command: a web page to see what a CellProfiler profile looks like, live."""
import click

from cli.common import call, checkpoint_option, start_tensorflow


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False, type=click.Path())
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="The converted dataset the model was trained on: treatment means, cells "
                   "by id, the nearest real cells, the features' correlations (sliders move "
                   "correlated features together) and re-measuring drawn cells.")
@click.option("--server", default=None,
              help="Use a model served by TensorFlow Serving instead of MODEL: its REST "
                   "address (http://host:8501), or host:8500 with --grpc.")
@click.option("--model-name", default=None, help="The served model's name (with --server).")
@click.option("--grpc", "use_grpc", is_flag=True, help="With --server: use the gRPC API.")
@click.option("--model-version", type=int, default=None,
              help="With --server: a version [default: the latest served].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but 127.0.0.1/localhost lets other machines "
                   "open the page (there is no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--max-cells", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Training cells of --data read at start for the nearest real cells.")
@click.option("--extrapolate", is_flag=True,
              help="Let sliders, traversals and interpolations go beyond the training range "
                   "(the manifest's min and max); by default values stop at its limits.")
@checkpoint_option()
def explore(model_path, data_dir, server, model_name, use_grpc, model_version, host, port,
            max_cells, extrapolate, checkpoint):
    """See what a CellProfiler profile looks like, live, in a web browser.

    MODEL is a run folder of `fit`, an exported SavedModel or a model base of
    versions; or give --server URL --model-name NAME to use a model TensorFlow
    Serving serves. The page: pick a base profile (the median cell, a
    treatment's mean or a cell by id, with --data), move feature sliders in
    training SDs and see that cell redrawn (composite and channels). With
    --data a slider moves its feature with the features correlated with it,
    as traverse does ("this feature alone" on the page holds the others), and
    beside each moved slider the page shows the value re-measured on the
    drawn cell with cp-measure next to the one asked. Also: the nearest real
    cells, traversal strips and interpolation between treatments; download
    the image (PNG, TIFF) and the profile (CSV); share the URL, which holds
    the profile.
    """
    from cp2image_tf import explore as lib

    if model_path is None and server is None:
        raise click.UsageError("Give MODEL (a run folder or SavedModel), or --server URL "
                               "--model-name NAME for a model TensorFlow Serving serves.")
    if model_path is not None and server is not None:
        raise click.UsageError("Give MODEL or --server, not both.")
    if server is not None and not model_name:
        raise click.UsageError("--server needs --model-name NAME (the served MODEL_NAME).")
    if not lib.is_local(host):
        click.echo(f"Warning: --host {host}: the page will be reachable from other machines, "
                   "without a login; it shows the model and --data's cells to anyone who can "
                   "connect.", err=True)
    sock = call(lib.bind, host, port)  # a busy port fails before the model is loaded
    start_tensorflow()
    if server is not None:
        from cp2image_tf.serving.remote import RemoteModel

        model = call(RemoteModel, server, model_name, grpc=use_grpc, version=model_version)
    else:
        from cp2image_tf.serving.local import load_model

        model = call(load_model, model_path, checkpoint)
    click.echo(f"Model: {model.source}")
    app = call(lib.create_app, model, data_dir, max_cells=max_cells, progress=click.echo,
               extrapolate=extrapolate)
    explorer = app.state.explorer
    if explorer.reference is not None:
        click.echo(f"Loaded {len(explorer.reference.ids)} training cells of {data_dir} "
                   f"(at most --max-cells {max_cells}) and {len(explorer.treatments)} "
                   "treatment means.")

    def ready(url):
        click.echo(f"Open {url} in a browser (Ctrl+C to stop).")

    try:
        call(lib.serve, app, host, port, ready=ready, sock=sock)
    except KeyboardInterrupt:
        pass
