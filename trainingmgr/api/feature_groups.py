"""Feature group routes: the spec's paths and their /ai-ml-model-training/v1/featureGroup forms."""
from __future__ import annotations

from flask import Blueprint, request, url_for

from ..schemas.feature_group import (
    FeatureGroupConfigSchema,
    FeatureGroupDeleteSchema,
    FeatureGroupUpdateSchema,
    dump_feature_group,
)
from ..services.feature_groups import group_view
from ..services.pagination import page_request
from .common import json_body, load, next_link, services

bp = Blueprint("feature_groups", __name__)

V1 = "/ai-ml-model-training/v1/featureGroup"
MAX_PAGE = 1000

_config_schema = FeatureGroupConfigSchema()
_update_schema = FeatureGroupUpdateSchema()
_delete_schema = FeatureGroupDeleteSchema()


@bp.post(V1)
def create_feature_group():
    data = load(_config_schema, json_body())
    fg = services().feature_groups().create(data)
    location = url_for(".get_feature_group", featuregroup_name=fg.name)
    view = dump_feature_group(group_view(fg))
    # The spec's {result, featuregroup}, and the record's fields at the top level as the reference's clients read them.
    return {**view, "result": f"Feature group {fg.name} created", "featuregroup": view}, 201, {"Location": location}


@bp.get(V1)
def list_feature_groups():
    page_req = page_request(request.args, default_limit=MAX_PAGE, max_limit=MAX_PAGE, key_type=str)
    page = services().feature_groups().views(page_req)
    items = [dump_feature_group(fg) for fg in page.items]
    # "FeatureGroups" is the reference implementation's key, still read by its dashboard.
    return {"featuregroups": items, "FeatureGroups": items}, 200, next_link(page, page_req.limit)


@bp.get(f"{V1}/<featuregroup_name>")
@bp.get("/featureGroup/<featuregroup_name>", endpoint="get_feature_group_legacy")
def get_feature_group(featuregroup_name: str):
    fg = dump_feature_group(services().feature_groups().view(featuregroup_name))
    # The reference answered the bare object; the spec wraps it. Both fit in one body.
    return {**fg, "featuregroup": fg}


@bp.put(f"{V1}/<featuregroup_name>")
@bp.put("/featureGroup/<featuregroup_name>", endpoint="update_feature_group_legacy")
def update_feature_group(featuregroup_name: str):
    data = load(_update_schema, json_body())
    fg = services().feature_groups().update(featuregroup_name, data)
    # The reference's wording: its clients compare the text.
    return {"result": "Feature Group Edited", "featuregroup": dump_feature_group(group_view(fg))}


@bp.delete(V1)
@bp.delete("/featureGroup", endpoint="delete_feature_groups_legacy")
def delete_feature_groups():
    data = load(_delete_schema, json_body())
    names = [item["featureGroup_name"] for item in data["featuregroups_list"]]
    result = services().feature_groups().delete_many(names)
    ok, failed = len(result.deleted), len(result.failures)
    return {
        "success_count": ok,
        "failure_count": failed,
        # The reference's spelling, read by its dashboard.
        "success count": ok,
        "failure count": failed,
        "failures": result.failures,
    }
