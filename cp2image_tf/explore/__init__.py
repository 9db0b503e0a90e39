"""explore: a web page to see what a CellProfiler profile looks like, live.

    from cp2image_tf import explore
    app = explore.create_app(load_model("demo-output/models/cp2image"), data="demo-output/tfrecords")
    explore.serve(app, port=8080)          # or: cp2image-tf explore MODEL --data DATA_DIR

The model (a LocalModel, or a RemoteModel talking to TensorFlow Serving) is loaded once;
every request runs its serving signatures. explorer.py holds the page's logic, app.py its
routes, server.py the socket and uvicorn.
"""
from cp2image_tf.explore.app import STATIC, create_app
from cp2image_tf.explore.explorer import OFFSET_LIMIT, Explorer
from cp2image_tf.explore.server import BackgroundServer, bind, is_local, serve

__all__ = ["OFFSET_LIMIT", "STATIC", "BackgroundServer", "Explorer", "bind", "create_app",
           "is_local", "serve"]
