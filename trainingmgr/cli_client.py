"""`trainingmgr jobs | featuregroups | pipelines ...`: the service's API from a shell, through TrainingManagerClient
(HTTP only). `--url`/TM_URL names the service, `--token`/TM_TOKEN the credential; `--json` prints what the API
answered instead of a table.

Exit codes a script can use:
  0  done (`jobs wait`: the job FINISHED)
  1  the job ended FAILED or CANCELLED (`jobs wait`, `jobs create --wait`)
  2  the command was used wrongly (click's own)
  3  the service refused the request (4xx: not found, not valid, not allowed ...)
  4  the service could not be reached, or failed (5xx)
  5  `--timeout` passed before the job ended
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import click
import requests

from .client import ClientError, TrainingManagerClient, Unreachable

JOB_FAILED, REFUSED, UNAVAILABLE, TIMED_OUT = 1, 3, 4, 5


class CommandFailed(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def api_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """A command that talks to the service: --url and --token, a client as its first argument, and its API errors
    as exit codes 3 (refused) and 4 (unreachable or failing)."""
    @functools.wraps(function)
    def run(*args: Any, url: str, token: str | None, **kwargs: Any) -> Any:
        try:
            return function(TrainingManagerClient(url, token), *args, **kwargs)
        except ClientError as e:
            raise CommandFailed(str(e), REFUSED if e.status < 500 else UNAVAILABLE) from None
        except Unreachable as e:
            raise CommandFailed(str(e), UNAVAILABLE) from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL) as e:
            raise click.UsageError(f"--url {url!r} is not a service URL such as http://host:32002 ({e})") from None
        except (requests.RequestException, ValueError) as e:  # a connection cut mid-answer, an answer not JSON
            raise CommandFailed(f"{url}: {e.__class__.__name__}: {str(e)[:300]}", UNAVAILABLE) from None

    run = click.option("--token", envvar="TM_TOKEN", default=None, show_envvar=True,
                       help="API token or JWT, sent as Authorization: Bearer.")(run)
    return click.option("--url", envvar="TM_URL", default="http://localhost:32002", show_default=True,
                        show_envvar=True, help="The service.")(run)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")


def table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Rows as aligned text columns: (heading, key) pairs; missing values as "-"."""
    lines = [[heading for heading, _ in columns]]
    for row in rows:
        lines.append(["-" if row.get(key) in (None, "") else str(row[key]) for _, key in columns])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _read_json(file: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        body = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise click.BadParameter(f"{file}: {e}", param_hint="-f") from None
    if not isinstance(body, dict):
        raise click.BadParameter(f"{file}: a JSON object is needed", param_hint="-f")
    return body


def _duration(job: dict[str, Any]) -> str:
    from datetime import datetime, timezone

    if not job.get("started_at"):
        return ""
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else datetime.now(timezone.utc)
    return f"{(end - start).total_seconds():.1f}s"


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    model = job["modelId"]
    return {"id": job["id"], "status": job["status"], "model": model["modelname"], "version": model["modelversion"],
            "artifact": model["artifactversion"], "created": job["created_at"][:19].replace("T", " "),
            "duration": _duration(job), "reason": job.get("failure_reason", "")[:60]}


JOB_COLUMNS = [("ID", "id"), ("STATUS", "status"), ("MODEL", "model"), ("VERSION", "version"),
               ("ARTIFACT", "artifact"), ("CREATED", "created"), ("DURATION", "duration"), ("REASON", "reason")]


# ---------------------------------------------------------------------------------------------- jobs
@click.group("jobs")
def jobs() -> None:
    """Training jobs: list, show, create, wait, cancel, download."""


@jobs.command("list")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True, help="Newest first.")
@json_option
@api_command
def jobs_list(client: TrainingManagerClient, limit: int, as_json: bool) -> None:
    """The newest training jobs."""
    found = client.jobs(limit)
    if as_json:
        return _json(found)
    click.echo(table((_job_row(job) for job in found), JOB_COLUMNS))


@jobs.command("show")
@click.argument("job_id", type=click.IntRange(1))
@json_option
@api_command
def jobs_show(client: TrainingManagerClient, job_id: int, as_json: bool) -> None:
    """One job: its steps with their times, and its history."""
    job = client.job(job_id)
    if as_json:
        return _json(job)
    row = _job_row(job)
    click.echo(f"job {job_id}: {row['status']}  model {row['model']} {row['version']} artifact {row['artifact']}")
    history = client.events(job_id)
    reason = job.get("failure_reason") or (history[-1]["reason"] if job["status"] == "CANCELLED" and history
                                           else None)
    if reason:
        click.echo(f"reason: {reason}")
    if job.get("model_url"):
        click.echo(f"model: {job['model_url']}")
    click.echo("")
    click.echo(table(({"step": s["name"], "state": s["state"], "started": _moment(s["started_at"]),
                       "ended": _moment(s["finished_at"]),
                       "seconds": "" if s["duration_seconds"] is None else f"{s['duration_seconds']:.3f}"}
                      for s in job["steps"]),
                     [("STEP", "step"), ("STATE", "state"), ("STARTED", "started"), ("ENDED", "ended"),
                      ("SECONDS", "seconds")]))
    click.echo("")
    click.echo(table(({"time": _moment(e["time"]), "change": _change(e), "reason": (e["reason"] or "")[:80]}
                      for e in history),
                     [("TIME", "time"), ("CHANGE", "change"), ("REASON", "reason")]))


def _moment(stamp: str | None) -> str:
    """An API time (ISO 8601, UTC) as `YYYY-MM-DD HH:MM:SS.mmm` (UTC)."""
    return (stamp or "")[:23].replace("T", " ")


def _change(event: dict[str, Any]) -> str:
    if event["step"] is None:
        return f"job {event['to']}"
    return f"{event['step']} {event['from']} -> {event['to']}"


def _follow(client: TrainingManagerClient, job_id: int, timeout: float) -> dict[str, Any]:
    """Wait for the job, showing each change on stderr; exit 1 (failed, cancelled) or 5 (timeout) unless it
    FINISHED."""
    started = time.monotonic()

    def show(job: dict[str, Any]) -> None:
        steps = " ".join(f"{step}={state}" for step, state in job["steps_state"].items())
        click.echo(f"[{time.monotonic() - started:6.1f}s] job {job_id} {job['status']}: {steps}", err=True)
        if job.get("waiting"):
            click.echo(f"          waiting: {job['waiting']['reason']}", err=True)

    job = client.wait(job_id, timeout, show)
    if job is None:
        raise CommandFailed(f"job {job_id} did not end within {timeout:.0f} s", TIMED_OUT)
    if job["status"] != "FINISHED":
        raise CommandFailed(f"job {job_id} ended {job['status']}: {job.get('failure_reason') or 'no reason'}",
                            JOB_FAILED)
    click.echo(f"job {job_id} FINISHED; model: {job['model_url']}")
    return job


@jobs.command("create")
@click.option("-f", "file", required=True, help="The training request (JSON, as POST .../training-jobs takes); - "
                                                 "for standard input.")
@click.option("--wait", "wait_for", is_flag=True, help="Wait for the job to end (exit codes as `jobs wait`).")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds --wait waits.")
@api_command
def jobs_create(client: TrainingManagerClient, file: str, wait_for: bool, timeout: float) -> None:
    """Start a training job; prints its id."""
    job = client.create_job(_read_json(file))
    click.echo(job["id"])
    click.echo(f"job {job['id']} created: {job['modelId']['modelname']} {job['modelId']['modelversion']} "
               f"artifact {job['modelId']['artifactversion']}", err=True)
    if wait_for:
        _follow(client, job["id"], timeout)


@jobs.command("wait")
@click.argument("job_id", type=click.IntRange(1))
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds to wait.")
@api_command
def jobs_wait(client: TrainingManagerClient, job_id: int, timeout: float) -> None:
    """Wait until the job ends: exit 0 when it FINISHED, 1 when it FAILED or was CANCELLED, 5 on timeout."""
    _follow(client, job_id, timeout)


@jobs.command("logs")
@click.argument("job_id", type=click.IntRange(1))
@click.option("--follow", "-f", is_flag=True, help="Go on printing the output as the run writes it, until the "
                                                   "job ends.")
@api_command
def jobs_logs(client: TrainingManagerClient, job_id: int, follow: bool) -> None:
    """Print the output of the job's pipeline run (its last part when long)."""
    out = sys.stdout.buffer  # the bytes as the run wrote them
    for data in client.follow_log(job_id) if follow else [client.log(job_id)[0]]:
        out.write(data)
        out.flush()


@jobs.command("cancel")
@click.argument("job_id", type=click.IntRange(1))
@api_command
def jobs_cancel(client: TrainingManagerClient, job_id: int) -> None:
    """Stop the job; it stays, CANCELLED, with its history."""
    job = client.cancel_job(job_id)
    click.echo(f"job {job_id} {job['status']}")


@jobs.command("download")
@click.argument("job_id", type=click.IntRange(1))
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write it (default: <model>-<version>-<artifact>-Model.zip here).")
@api_command
def jobs_download(client: TrainingManagerClient, job_id: int, output: Path | None) -> None:
    """Download the job's trained Model.zip."""
    job = client.job(job_id)
    if job["status"] != "FINISHED":
        raise CommandFailed(f"job {job_id} is {job['status']}: only a FINISHED job has a model", REFUSED)
    model = job["modelId"]
    target = output or Path(f"{model['modelname']}-{model['modelversion']}-{model['artifactversion']}-Model.zip")
    with click.progressbar(length=0, label=f"Model.zip of job {job_id}", file=sys.stderr,
                           show_pos=True) as bar:
        def progress(done: int, total: int | None) -> None:
            if total and bar.length != total:
                bar.length = total
            bar.update(done - bar.pos)

        size = client.download_model(job, target, progress)
    click.echo(f"{target} ({size} bytes)")


# ---------------------------------------------------------------------------------------------- feature groups
@click.group("featuregroups")
def featuregroups() -> None:
    """Feature groups: list, show, create, delete."""


@featuregroups.command("list")
@json_option
@api_command
def featuregroups_list(client: TrainingManagerClient, as_json: bool) -> None:
    """Every feature group, by name."""
    found = client.feature_groups()
    if as_json:
        return _json(found)
    click.echo(table(found, [("NAME", "featuregroup_name"), ("SOURCE", "datalake_source"),
                             ("FEATURES", "feature_list"), ("DME", "enable_dme")]))


@featuregroups.command("show")
@click.argument("name")
@api_command
def featuregroups_show(client: TrainingManagerClient, name: str) -> None:
    """One feature group, as the API answers it (its token shown as ****)."""
    _json(client.feature_group(name))


@featuregroups.command("create")
@click.option("-f", "file", required=True, help="The feature group (JSON, as POST .../featureGroup takes); - for "
                                                 "standard input.")
@api_command
def featuregroups_create(client: TrainingManagerClient, file: str) -> None:
    """Create a feature group."""
    created = client.create_feature_group(_read_json(file))
    click.echo(f"feature group {created.get('featuregroup_name', '')} created")


@featuregroups.command("delete")
@click.argument("names", nargs=-1, required=True)
@api_command
def featuregroups_delete(client: TrainingManagerClient, names: tuple[str, ...]) -> None:
    """Delete feature groups (those in use by a job stay; then the exit code is 3)."""
    answer = client.delete_feature_groups(list(names))
    _json(answer)
    if answer.get("failure_count"):
        raise CommandFailed(f"{answer['failure_count']} of {len(names)} feature groups were not deleted", REFUSED)


# ---------------------------------------------------------------------------------------------- pipelines
@click.group("pipelines")
def pipelines() -> None:
    """Pipelines: list, versions, upload."""


@pipelines.command("list")
@json_option
@api_command
def pipelines_list(client: TrainingManagerClient, as_json: bool) -> None:
    """Every pipeline."""
    found = client.pipelines()
    if as_json:
        return _json(found)
    click.echo(table(found, [("NAME", "display_name"), ("CREATED", "created_at"), ("DESCRIPTION", "description")]))


@pipelines.command("versions")
@click.argument("name")
@api_command
def pipelines_versions(client: TrainingManagerClient, name: str) -> None:
    """The versions of a pipeline, oldest first."""
    for version in client.pipeline_versions(name):
        click.echo(version)


@pipelines.command("upload")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--description", default="", help="What the pipeline does.")
@api_command
def pipelines_upload(client: TrainingManagerClient, name: str, file: Path, description: str) -> None:
    """Upload a compiled pipeline (YAML) as a new version of NAME."""
    answer = client.upload_pipeline(name, file, description)
    named = f" ({answer['version_name']})" if answer.get("version_name") else ""
    click.echo(f"pipeline {name}: version {answer.get('version', '?')}{named} uploaded")
