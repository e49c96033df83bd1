"""Feature groups: the rules for creating, reading, updating and deleting them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..adapters.base import AdapterError
from ..adapters.outbound import OutboundDenied, OutboundPolicy
from ..errors import BadGateway, BadRequest, Conflict, NotFound, ValidationFailed
from ..models import FeatureGroup, TrainingJob
from ..schemas.feature_group import SOURCE_FIELDS
from ..schemas.fields import NAME_PATTERN, NAME_RULE
from ..secrets import MASK, TokenCipher
from .pagination import Page, PageRequest, as_views, keyset_page, object_view

log = logging.getLogger(__name__)


@dataclass
class BulkDeleteResult:
    deleted: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


# A name longer than any valid one (63) is shown, in answers and log lines, as its first this many characters and
# "…": a client's 15 MB "name" is neither echoed nor logged in full.
SHOWN_NAME_CHARS = 64


def shown_name(name: str) -> str:
    return name if len(name) <= SHOWN_NAME_CHARS else name[:SHOWN_NAME_CHARS] + "…"


def check_name(name: str) -> None:
    """A name in a path: 400 when it cannot be a feature group's name at all."""
    if not NAME_PATTERN.fullmatch(name):
        raise BadRequest(f"Invalid feature group name {shown_name(name)!r}: {NAME_RULE}.")


# What decides where a feature group's token is sent (and what it unlocks there).
SECRET_DESTINATION = ("datalake_source", "host", "port", "bucket", "db_org")


_GROUPS = FeatureGroup.__table__
# What a feature group's representation shows (schemas.feature_group.dump_feature_group), in one Core SELECT: the
# reads build no ORM object. Writes work on FeatureGroup.
GROUP_VIEW = select(
    _GROUPS.c.id, _GROUPS.c.name, _GROUPS.c.feature_list, _GROUPS.c.datalake_source, _GROUPS.c.host, _GROUPS.c.port,
    _GROUPS.c.bucket, _GROUPS.c.token_encrypted, _GROUPS.c.db_org, _GROUPS.c.measurement, _GROUPS.c.enable_dme,
    _GROUPS.c.measured_obj_class, _GROUPS.c.dme_port, _GROUPS.c.source_name,
)
_VIEW_OF_GROUP = GROUP_VIEW.where(_GROUPS.c.name == bindparam("name"))


def group_view(fg: FeatureGroup) -> dict[str, Any]:
    """A FeatureGroup as its view (GROUP_VIEW's columns by name): what a write answers, without a second query."""
    return object_view(GROUP_VIEW, fg)


class FeatureGroupService:
    """Feature groups with enable_dme have a DME information job; the row and the job are kept consistent: the
    database change is flushed first, the DME is called, and the transaction commits only when the DME agreed."""

    def __init__(self, session: Session, cipher: TokenCipher, dme: Any, outbound: OutboundPolicy):
        self.session = session
        self.cipher = cipher
        self.dme = dme
        self.outbound = outbound

    def _find(self, name: str) -> FeatureGroup | None:
        return self.session.scalar(select(FeatureGroup).where(FeatureGroup.name == name))

    def get(self, name: str) -> FeatureGroup:
        check_name(name)
        fg = self._find(name)
        if fg is None:
            raise NotFound(f"Feature group {name!r} does not exist")
        return fg

    def view(self, name: str) -> dict[str, Any]:
        """The feature group's view (GROUP_VIEW's columns by name), or NotFound."""
        check_name(name)
        found = as_views(self.session.execute(_VIEW_OF_GROUP, {"name": name}))
        if not found:
            raise NotFound(f"Feature group {name!r} does not exist")
        return found[0]

    def views(self, page: PageRequest) -> Page[dict[str, Any]]:
        """Views of feature groups (GROUP_VIEW's columns by name) by name, keyset-paged."""
        return keyset_page(self.session, GROUP_VIEW, _GROUPS.c.name, page, views=True)

    def create(self, data: dict[str, Any]) -> FeatureGroup:
        name = data["featuregroup_name"]
        if self._find(name) is not None:
            raise Conflict(f"Feature group {name!r} already exists")
        fg = FeatureGroup(name=name)
        self._assign(fg, data, keep_token=False)
        self.session.add(fg)
        try:
            self.session.flush()
        except IntegrityError:
            # Another request created the same name between our check and our insert.
            self.session.rollback()
            raise Conflict(f"Feature group {name!r} already exists") from None
        if fg.enable_dme:
            self._dme(self.dme.create_job, fg, "created", "the feature group was not created")
        try:
            self.session.commit()
        except IntegrityError:
            self.session.rollback()
            if fg.enable_dme:
                self._compensate(self.dme.delete_job, fg)
            raise Conflict(f"Feature group {name!r} already exists") from None
        log.info("feature group created", extra={"featuregroup": name})
        return fg

    def update(self, name: str, data: dict[str, Any]) -> FeatureGroup:
        fg = self.get(name)
        if data["featuregroup_name"] != name:
            raise ValidationFailed(
                {"featuregroup_name": [f"Must equal the name in the path ({name!r}): renaming is not supported."]}
            )
        if data.get("id") is not None and data["id"] != fg.id:
            raise ValidationFailed({"id": [f"Must be this feature group's id ({fg.id}) or left out."]})
        had_dme = fg.enable_dme
        # Where its DME job lives now: the update may change host and port.
        previous = SimpleNamespace(name=fg.name, host=fg.host, dme_port=fg.dme_port)
        # The UI shows the mask; sending it back unchanged keeps the stored token, but only for the destination it
        # was given for: a stored secret must never follow a changed host to somebody else's server.
        keep_token = data["token"] == MASK
        if keep_token and fg.token_encrypted:
            moved = [f for f in SECRET_DESTINATION if str(getattr(fg, f) or "") != str(data.get(f) or "")]
            if moved:
                raise ValidationFailed({"token": [
                    f"Send the token again: {', '.join(moved)} changed, and the stored token is only ever sent "
                    "where it was given for (\"****\" keeps it only while the destination stays the same)."]})
        self._assign(fg, data, keep_token=keep_token)
        self.session.flush()
        if fg.enable_dme:
            # PUT creates the job or replaces it with the new definition.
            self._dme(self.dme.create_job, fg, "updated", "the feature group was not changed")
            if had_dme and (previous.host, previous.dme_port) != (fg.host, fg.dme_port):
                # The job moved to another DME: the old one must not stay behind.
                self._compensate(self.dme.delete_job, previous)
        elif had_dme:
            self._dme(self.dme.delete_job, previous, "deleted", "the feature group was not changed")
        self.session.commit()
        log.info("feature group updated", extra={"featuregroup": name})
        return fg

    def delete_many(self, names: list[str]) -> BulkDeleteResult:
        result = BulkDeleteResult()
        for name in names:
            reason = self._delete_one(name)
            if reason is None:
                result.deleted.append(name)
            else:
                result.failures.append({"featureGroup_name": shown_name(name), "reason": reason})
        self.session.commit()
        log.info(
            "feature groups deleted",
            extra={"deleted": result.deleted, "failed": [f["featureGroup_name"] for f in result.failures]},
        )
        return result

    def _delete_one(self, name: str) -> str | None:
        if not NAME_PATTERN.fullmatch(name):
            return f"invalid name: {NAME_RULE}"
        fg = self._find(name)
        if fg is None:
            return "does not exist"
        in_use = self.session.scalar(
            select(func.count()).select_from(TrainingJob).where(TrainingJob.feature_group_id == fg.id)
        )
        if in_use:
            return f"used by {in_use} training job(s)"
        if fg.enable_dme:
            try:
                self.dme.delete_job(fg)
            except AdapterError as e:
                return f"its DME information job could not be deleted: {e}"
        savepoint = self.session.begin_nested()
        try:
            self.session.delete(fg)
            self.session.flush()
        except IntegrityError:
            # A training job started using it after our check: the foreign key keeps it, so its job comes back.
            savepoint.rollback()
            if fg.enable_dme:
                self._compensate(self.dme.create_job, fg)
            return "used by a training job"
        savepoint.commit()
        return None

    def _dme(self, call: Any, fg: Any, done: str, undone: str) -> None:
        """Call the DME; on failure roll the flushed change back and answer 502."""
        try:
            call(fg)
        except AdapterError as e:
            self.session.rollback()
            # The client learns that the DME failed, not how: its answer (a status, an error page, a timeout) would
            # tell which ports of an internal host are open. The log has the detail.
            log.warning("DME call failed: %s", e, extra={"featuregroup": fg.name})
            raise BadGateway(f"The DME information job of {fg.name!r} could not be {done}: {undone}; the service "
                             "log says why") from None

    @staticmethod
    def _compensate(call: Any, fg: FeatureGroup) -> None:
        try:
            call(fg)
        except AdapterError:
            log.error("DME and database disagree; fix by hand", extra={"featuregroup": fg.name})

    def _check_destination(self, data: dict[str, Any]) -> str:
        """The host the service will connect to for this feature group (InfluxDB, the DME), normalised, if the
        outbound policy lets a client name it; a 400 naming the field and the rule otherwise."""
        host = data["host"]
        if not host:
            return host
        try:
            return self.outbound.check_host(host, "host")
        except OutboundDenied as e:
            raise ValidationFailed({"host": [f"{host!r} is not allowed: {e.rule} (TM_OUTBOUND_ALLOW changes this)"]})
        except ValueError as e:
            raise ValidationFailed({"host": [str(e)]}) from None

    def _assign(self, fg: FeatureGroup, data: dict[str, Any], *, keep_token: bool) -> None:
        unused = SOURCE_FIELDS[data["datalake_source"]]["unused"]
        if unused:
            # A source that does not read them keeps none of them (nor a secret it would never use).
            data = {**data, **dict.fromkeys(unused, "")}
            keep_token = False
        data = {**data, "host": self._check_destination(data)}
        fg.feature_list = data["feature_list"]
        fg.datalake_source = data["datalake_source"]
        fg.host = data["host"]
        fg.port = data["port"] or ""
        fg.bucket = data["bucket"]
        fg.db_org = data["db_org"]
        fg.measurement = data["measurement"]
        fg.enable_dme = data["enable_dme"]
        # Absent optional values are answered as "": store "" back as absent.
        fg.measured_obj_class = data.get("measured_obj_class") or None
        fg.dme_port = data.get("dme_port") or None
        fg.source_name = data.get("source_name") or None
        if not keep_token:
            fg.token_encrypted = self.cipher.encrypt(data["token"] or "")

    def token(self, fg: FeatureGroup) -> str:
        """The clear token, for adapters that connect to the source; never for a response."""
        return self.cipher.decrypt(fg.token_encrypted)
