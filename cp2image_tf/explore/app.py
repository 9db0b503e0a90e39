"""explore's web app: the FastAPI routes over an Explorer, and the page's static files.

Endpoints (GET; errors are JSON {"error": "..."}: 400 bad input, 404 an unknown cell or
treatment, 503 TensorFlow Serving not answering):
    /                        the page (static/: plain HTML, JS and CSS, no build step)
    /api/info                model, features (compartment, module, median, SD), treatments, data
    /api/base?base=B         a base's raw profile (NaN filled with the training median)
    /api/cells?q=TEXT[&lookup=1]
                             loaded cell ids starting with TEXT, and whether TEXT is a cell of
                             DATA_DIR (lookup=1: also reading DATA_DIR for the others)
    /api/render?PROFILE      the generated cell: its channels side by side in one greyscale PNG
                             (round(255 x the picture)), for the page to colour; with DATA_DIR
                             the features correlated with the moved ones move too (alone=1:
                             not), and which did; the picture edits the base's cell (pinned)
    /api/remeasure?PROFILE   the moved features re-measured on the drawn cell (cp-measure),
                             beside the asked values, or why they cannot be
    /api/profile?PROFILE     the raw profile as JSON, with the offsets used and clamping notes
    /api/image.png?PROFILE   the picture's colour composite (as generate_png colours it)
    /api/image.tiff?PROFILE  an ImageJ hyperstack with named channels (viz.write_hyperstack)
    /api/profile.csv?PROFILE one row of raw values: a PROFILES table for `cp2image-tf generate`
    /api/neighbours?PROFILE&k=6
                             the real DATA_DIR cells nearest to the profile in SD units
    /api/traverse?PROFILE&feature=F&start=-2&stop=2&steps=7[&alone=1]
                             one feature varied around the profile, as `traverse` does
    /api/interpolate?a=A&b=B&steps=7
                             from treatment A's mean profile to B's
"""
import logging
import re
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from cp2image_tf.explore.explorer import MAX_CELLS, RESERVED, ApiError, Explorer
from tfrecords_tools.errors import UserInputError

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("cp2image_tf.explore")


def create_app(model, data=None, max_cells: int = MAX_CELLS, progress=None,
               extrapolate: bool = False, remeasure: bool = True):
    """A FastAPI app serving the page and its API for `model` (a LocalModel or RemoteModel,
    see serving.local.load_model and serving.remote.RemoteModel); `data` is the dataset the model
    was trained on (treatment means, cell bases, the nearest real cells); `extrapolate` lets
    profiles and strips go beyond the training range; `remeasure` re-measures drawn cells
    (with `data`; prepared in a thread at start)."""
    explorer = Explorer(model, data, max_cells, progress, extrapolate, remeasure)
    app = FastAPI(title="cp2image-tf explore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = explorer
    _answer_errors(app)
    _serve_page(app)
    _serve_api(app, explorer)
    _serve_downloads(app, explorer)
    return app


def _answer_errors(app) -> None:
    """Errors as JSON {"error": ...}: 400 for bad input, the ApiError's status, 500 for the
    unexpected (OneLineErrors)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(UserInputError)
    async def user_error(request: Request, err: UserInputError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                             for e in err.errors())
        return JSONResponse({"error": problems or "bad request"}, status_code=400)

    app.add_middleware(OneLineErrors)


def _params(request: Request) -> dict:
    return dict(request.query_params)


def _attachment(profile_params: dict, ext: str) -> dict:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", profile_params.get("base") or "median")
    changed = len([k for k in profile_params if k not in RESERVED])
    name = f"cp2image_{base}" + (f"_{changed}changed" if changed else "") + f".{ext}"
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _serve_page(app) -> None:
    """The page and its static files (never cached: a new version shows at once)."""
    no_cache = {"Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers=no_cache)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _serve_api(app, explorer) -> None:
    """The JSON endpoints the page calls."""
    @app.get("/api/info")
    def info():
        return explorer.info()

    @app.get("/api/base")
    def base(base: str = "median"):
        found = explorer.base(base)
        return {"base": base, "label": found.label, "raw": found.raw.tolist(),
                "missing": found.missing}

    @app.get("/api/cells")
    def cells(q: str = "", lookup: bool = False):
        return explorer.cells(q, lookup)

    @app.get("/api/render")
    def render(request: Request):
        return explorer.render(_params(request))

    @app.get("/api/profile")
    def profile(request: Request):
        found = explorer.profile(_params(request))
        return {"base": found.base, "label": found.label, "offsets": found.offsets,
                "raw": dict(zip(explorer.names, found.raw.tolist())),
                "clamped": found.clamped, "notes": found.notes()}

    @app.get("/api/remeasure")
    def remeasure(request: Request):
        return explorer.remeasured(_params(request))

    @app.get("/api/neighbours")
    def neighbours(request: Request, k: int = 6):
        return explorer.neighbours(_params(request), k)

    @app.get("/api/traverse")
    def traverse(request: Request):
        return explorer.traverse(_params(request))

    @app.get("/api/interpolate")
    def interpolate(request: Request):
        return explorer.interpolate(_params(request))


def _serve_downloads(app, explorer) -> None:
    """The image (PNG, TIFF) and the profile (CSV), as the page's download buttons ask."""
    @app.get("/api/image.png")
    def image_png(request: Request):
        p = _params(request)
        return Response(explorer.png(explorer.profile(p)), media_type="image/png",
                        headers=_attachment(p, "png") if "download" in p else None)

    @app.get("/api/image.tiff")
    def image_tiff(request: Request):
        p = _params(request)
        return Response(explorer.tiff(p), media_type="image/tiff", headers=_attachment(p, "tif"))

    @app.get("/api/profile.csv")
    def profile_csv(request: Request):
        p = _params(request)
        return Response(explorer.csv(p), media_type="text/csv", headers=_attachment(p, "csv"))


class OneLineErrors:
    """ASGI middleware: an unexpected exception becomes a JSON 500 and one line in the log
    (where it was raised), not a traceback in the terminal or the browser."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:  # noqa: BLE001  (anything an endpoint did not expect)
            where = traceback.extract_tb(err.__traceback__)[-1]
            log.error("explore: %s %s failed: %s: %s (at %s:%d)", scope.get("method", ""),
                      scope.get("path", ""), type(err).__name__, err,
                      Path(where.filename).name, where.lineno)
            if scope["type"] == "http" and not started:
                response = JSONResponse({"error": f"internal error ({type(err).__name__}: {err})"},
                                        status_code=500)
                await response(scope, receive, send)
