"""Runs one compiled pipeline with kfp.local, in a process of its own: `python -m ... RUN_DIR [DONE_FD]`.

kfp.local is process-wide (local.init) and swaps builtins.print during a task, so each run gets its own process.
RUN_DIR holds `request.json` ({"pipeline_file", "parameters"}); the runner writes `result.json` atomically:
{"state": "SUCCEEDED"|"FAILED", "error", "model_path", "metrics"}, then closes DONE_FD (a pipe the service reads).
The run's files stay under RUN_DIR/root.
"""
from __future__ import annotations

import json
import os
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MODEL_TYPE = "system.Model"
METRICS_TYPE = "system.Metrics"


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run_dir / "result.json")


def output_types(pipeline_file: str) -> dict[tuple[str, str], str]:
    """(task name, output name) -> schemaTitle, from the compiled pipeline: kfp's executor_output.json has no types."""
    from .pipeline_files import yaml_documents

    # kfp may append platform config as a second YAML document: the pipeline spec is the first.
    spec = next(yaml_documents(Path(pipeline_file).read_text()))
    components = spec.get("components", {})
    types: dict[tuple[str, str], str] = {}

    def walk(dag: dict[str, Any]) -> None:
        for task_name, task in (dag.get("tasks") or {}).items():
            component = components.get(task.get("componentRef", {}).get("name", ""), {})
            if "dag" in component:
                walk(component["dag"])
            outputs = component.get("outputDefinitions", {}).get("artifacts", {})
            for output_name, output in outputs.items():
                types[(task_name, output_name)] = output.get("artifactType", {}).get("schemaTitle", "")

    walk(spec.get("root", {}).get("dag", {}))
    return types


def collect_outputs(pipeline_root: Path, types: dict[tuple[str, str], str]) -> tuple[str | None, dict[str, Any]]:
    """The model artifact (the newest system.Model output) and the merged metrics of every task of the run."""
    model_path: str | None = None
    model_mtime = -1.0
    metrics: dict[str, Any] = {}
    for executor_output in sorted(pipeline_root.glob("*/*/executor_output.json")):
        data = json.loads(executor_output.read_text())
        task_name = executor_output.parent.name
        for output_name, artifacts in data.get("artifacts", {}).items():
            for artifact in artifacts.get("artifacts", []):
                schema = artifact.get("type", {}).get("schemaTitle", "") or types.get((task_name, output_name), "")
                uri = artifact.get("uri", "")
                if schema == METRICS_TYPE:
                    metrics.update(artifact.get("metadata", {}))
                elif schema == MODEL_TYPE and uri and os.path.exists(uri):
                    mtime = os.path.getmtime(uri)
                    if mtime >= model_mtime:
                        model_path, model_mtime = uri, mtime
    return model_path, metrics


def parse_pipelines_with_libyaml() -> None:
    """Have kfp read compiled pipelines as pipeline_files does (its SAFE_LOADER: libyaml's parser where PyYAML has
    it): kfp calls PyYAML's pure Python safe_load_all, 20-30 ms of a run's start for the example pipeline (3 ms so).
    The same safe constructor builds the same values. In a run's process only (kfp.local is per process anyway)."""
    import yaml
    from kfp.dsl import structures

    from .pipeline_files import SAFE_LOADER, yaml_documents

    if getattr(structures, "yaml", None) is not yaml:
        return  # a kfp that reads YAML otherwise: left as it is
    libyaml = types.ModuleType("yaml")
    libyaml.__dict__.update(yaml.__dict__)
    libyaml.safe_load_all = yaml_documents  # type: ignore[attr-defined]
    libyaml.safe_load = lambda stream: yaml.load(stream, Loader=SAFE_LOADER)  # type: ignore[attr-defined]
    structures.yaml = libyaml


def run(run_dir: Path) -> dict[str, Any]:
    request = json.loads((run_dir / "request.json").read_text())
    from kfp import local
    from kfp.components import load_component_from_file
    from kfp.local import logging_utils

    parse_pipelines_with_libyaml()

    # The output is kept and served as the run's log, read in files and pages: no terminal colour codes in it.
    if hasattr(logging_utils, "color_text"):
        logging_utils.color_text = lambda text, color: text

    pipeline_root = run_dir / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = load_component_from_file(request["pipeline_file"])
    try:
        pipeline(**request["parameters"])
    except Exception as e:  # kfp.local reports a failed task as RuntimeError with ANSI colours
        return {"state": "FAILED", "error": ANSI.sub("", str(e)).strip()[-2000:]}
    model_path, metrics = collect_outputs(pipeline_root, output_types(request["pipeline_file"]))
    if model_path is None:
        return {"state": "FAILED", "error": "the pipeline produced no output artifact of type system.Model"}
    return {"state": "SUCCEEDED", "model_path": model_path, "metrics": metrics}


def main() -> None:
    run_dir = Path(sys.argv[1])
    done_fd = int(sys.argv[2]) if len(sys.argv) > 2 else None  # the service's "result written" pipe
    run_and_report(run_dir, done_fd)


def run_and_report(run_dir: Path, done_fd: int | None) -> None:
    """Run, write result.json, then close `done_fd`: in a process of its own (this module's main, or a child the
    warm launcher forked)."""
    try:
        result = run(run_dir)
    except Exception as e:  # a broken pipeline file or parameters: the run failed, say why
        traceback.print_exc()
        result = {"state": "FAILED", "error": f"{e.__class__.__name__}: {ANSI.sub('', str(e))}"[-2000:]}
    if result["state"] == "FAILED":
        # The log (output.log, served as the run's log) says why too, also when kfp.local printed nothing.
        print(f"run FAILED: {result['error']}", file=sys.stderr, flush=True)
    write_result(run_dir, result)
    if done_fd is not None:
        os.close(done_fd)  # tells the service now; this interpreter's teardown may take a while


if __name__ == "__main__":
    main()
