"""Model.zip downloads, streamed from the object store."""
from __future__ import annotations

from flask import Blueprint, Response

from ..errors import BadRequest, NotFound
from .common import services

bp = Blueprint("models", __name__)


@bp.get("/model/<modelname>/<modelversion>/<artifactversion>/Model.zip")
def download_model(modelname: str, modelversion: str, artifactversion: str):
    from ..adapters.object_store import InvalidObjectName, model_key

    store = services().object_store
    try:
        key = model_key(modelversion, artifactversion)
        size = store.size(modelname, key)
    except InvalidObjectName as e:
        raise BadRequest(f"Invalid model path: {e}") from None
    if size is None:
        raise NotFound(f"No model {modelname} version {modelversion} artifact {artifactversion}")
    response = Response(store.stream(modelname, key), mimetype="application/zip", direct_passthrough=True)
    response.headers["Content-Length"] = str(size)
    response.headers["Content-Disposition"] = "attachment; filename=Model.zip"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
