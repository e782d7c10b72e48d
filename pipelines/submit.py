"""Submit a compiled pipeline to a Kubeflow Pipelines cluster and start a run.

    onevision submit --host https://kfp.example.com --recipe recipes/ov-7b.yaml   # token: --token or $KFP_TOKEN

`submit_pipeline` talks to the KFP v2beta1 API through `kfp.Client`: it uploads the compiled YAML as a
new pipeline, or as a new version of the pipeline of that name (named `<pipeline>-<sha256[:12]>`, so
submitting the same file twice reuses its version), gets or creates the experiment and starts a run of
exactly that version. Parameters are checked against the compiled YAML before any request. Every
failure raises `SubmitError` naming the host and the step; the token never appears in messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import kfp
import urllib3
import yaml
from kfp_server_api import ApiException

TOKEN_ENV = "KFP_TOKEN"
TIMEOUT_S = 30


class SubmitError(RuntimeError):
    """Submitting to KFP failed; the message names the host and what failed."""


class _Client(kfp.Client):
    # kfp.Client's constructor probes healthz up to 5 times, 5 s apart, before an auth error shows: once here.
    def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:
        return self._healthz_api.healthz_service_get_healthz(_request_timeout=TIMEOUT_S)


def pipeline_parameters(package_path: str | Path) -> dict[str, dict[str, Any]]:
    """The pipeline's declared parameters (root.inputDefinitions.parameters of the compiled YAML)."""
    try:
        with open(package_path) as f:
            doc = next(yaml.safe_load_all(f), None) or {}  # a second document, if any, is the platform spec
    except (OSError, yaml.YAMLError) as err:
        raise SubmitError(f"{package_path}: cannot read the compiled pipeline: {err}") from err
    if not isinstance(doc, dict) or "root" not in doc:
        raise SubmitError(f"{package_path}: not a compiled KFP pipeline (no 'root')")
    return (doc["root"].get("inputDefinitions") or {}).get("parameters") or {}


def check_params(package_path: str | Path, params: dict[str, Any]) -> None:
    """Raise SubmitError for a parameter the pipeline does not declare or a required one left out."""
    declared = pipeline_parameters(package_path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise SubmitError(f"{package_path}: unknown pipeline parameter(s) {unknown}; known: {sorted(declared)}")
    missing = sorted(n for n, p in declared.items() if n not in params and not p.get("isOptional"))
    if missing:
        raise SubmitError(f"{package_path}: required pipeline parameter(s) {missing} not given")


def _named(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _version(client: kfp.Client, pipeline_id: str, name: str) -> Any:
    found = client.list_pipeline_versions(pipeline_id, filter=_named(name), page_size=2).pipeline_versions
    return found[0] if found else None


def _reason(err: BaseException) -> str:
    if isinstance(err, ApiException):
        if err.status in (401, 403):
            return f"HTTP {err.status} {err.reason}: credentials rejected (pass a valid token or set ${TOKEN_ENV})"
        if not err.status:
            return f"cannot reach the server: {err.reason}"
        body = err.body.decode(errors="replace") if isinstance(err.body, bytes) else str(err.body or "")
        return f"HTTP {err.status} {err.reason} {body[:500]}".strip()
    if isinstance(err, urllib3.exceptions.HTTPError):
        return f"cannot reach the server: {getattr(err, 'reason', None) or err}"
    return f"{type(err).__name__}: {err}"


def submit_pipeline(
    host: str,
    package_path: str,
    pipeline_name: str,
    *,
    experiment: str = "onevision",
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    token: str | None = None,
    namespace: str | None = None,
    version_name: str | None = None,
    service_account: str | None = "onevision-pipeline",
) -> dict[str, str]:
    """Upload `package_path` (pipeline or new version), get-or-create `experiment`, start a run.

    `token` is sent as `Authorization: Bearer <token>`; when None it is read from $KFP_TOKEN, and when
    neither is set no Authorization header is sent (kfp.Client may still use ~/.config/kfp/context.json).
    `namespace` (multi-user KFP) scopes the pipeline lookup/upload and the experiment.
    `version_name` defaults to `<pipeline_name>-<sha256 of the file, 12 hex>`; an existing version of
    that name is reused (if it records a different sha256 the submit fails rather than run other code).
    A new pipeline's first version is named like the pipeline (KFP's upload does so); resubmitting the
    same file reuses it. `service_account` runs the pods (infra/platform/base/rbac.yaml lets it create
    TrainJobs). Returns pipeline_id, version_id, experiment_id, run_id and run_url.
    """
    params = dict(params or {})
    host = host.rstrip("/") if host.startswith(("http://", "https://")) else "https://" + host.rstrip("/")
    try:
        check_params(package_path, params)
    except SubmitError as err:
        raise SubmitError(f"KFP at {host}: not submitted: {err}") from None
    token = token or os.environ.get(TOKEN_ENV) or None
    digest = hashlib.sha256(Path(package_path).read_bytes()).hexdigest()
    marker = f"sha256:{digest}"
    wanted = version_name or f"{pipeline_name}-{digest[:12]}"
    step = "connecting"
    try:
        # kfp.Client prints links to stdout (keep stdout for the caller) and warns about server versions.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client = _Client(host=host, existing_token=token, **({"namespace": namespace} if namespace else {}))
            if client.get_user_namespace():  # the constructor probes healthz only without a namespace
                client.get_kfp_healthz()
            namespace = namespace or client.get_user_namespace() or None

            step = f"looking up pipeline {pipeline_name!r}"
            found = client.list_pipelines(filter=_named(pipeline_name), namespace=namespace, page_size=2).pipelines
            if found and len(found) > 1:
                raise SubmitError(f"KFP at {host}: {len(found)} pipelines are named {pipeline_name!r}")
            if not found:
                step = f"uploading pipeline {pipeline_name!r}"
                pipeline_id = client.upload_pipeline(
                    package_path, pipeline_name, description=marker, namespace=namespace
                ).pipeline_id
                version = _version(client, pipeline_id, pipeline_name)
            else:
                pipeline_id = found[0].pipeline_id
                step = f"looking up version {wanted!r} of pipeline {pipeline_name!r}"
                version = _version(client, pipeline_id, wanted)
                if version is None and version_name is None:
                    first = _version(client, pipeline_id, pipeline_name)
                    version = first if first is not None and first.description == marker else None
                if version is not None and (version.description or "").startswith("sha256:") \
                        and version.description != marker:
                    raise SubmitError(f"KFP at {host}: version {wanted!r} of pipeline {pipeline_name!r} holds "
                                      f"another file ({version.description}); choose another version name")
                if version is None:
                    step = f"uploading version {wanted!r} of pipeline {pipeline_name!r}"
                    version = client.upload_pipeline_version(
                        package_path, wanted, pipeline_id=pipeline_id, description=marker
                    )
            if version is None:
                raise SubmitError(f"KFP at {host}: pipeline {pipeline_name!r} was uploaded but has no version")

            step = f"getting or creating experiment {experiment!r}"
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id

            step = "starting the run"
            run = client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name or f"{pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}",
                params=params,
                pipeline_id=pipeline_id,
                version_id=version.pipeline_version_id,
                service_account=service_account,
            )
    except SubmitError:
        raise
    except (ApiException, urllib3.exceptions.HTTPError, ValueError, OSError) as err:
        reason = _reason(err)
        if token:
            reason = reason.replace(token, "***")
        raise SubmitError(f"KFP at {host}: {step} failed: {reason}") from None
    return {
        "pipeline_id": pipeline_id,
        "version_id": version.pipeline_version_id,
        "experiment_id": experiment_id,
        "run_id": run.run_id,
        "run_url": f"{host}/#/runs/details/{run.run_id}",
    }
