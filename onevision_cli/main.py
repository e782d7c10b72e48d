"""The `onevision` command: one CLI that dispatches to plain functions.

    onevision recipe validate recipes/*.yaml
    onevision recipe show recipes/tiny.yaml
    onevision recipe plan recipes/ov-72b.yaml [--gpus-per-node 8 --gpu-memory-gb 80 --nodes 4]
    onevision stack up [--state-dir DIR] [--s3-port 8333] [--mlflow-port 5000]
    eval "$(onevision stack env)"
    onevision stack status | down
    onevision curate --recipe recipes/tiny.yaml --stage stage2_si --out /tmp/si [--workers 2] [--force]
    onevision run --recipe recipes/tiny.yaml [--s3-port 8333] [--mlflow-port 5000] [--verbose]   # the DAG, kfp.local
    onevision compile --recipe recipes/ov-7b.yaml -o ov-7b.yaml   # KFP YAML (--all: pipelines/compiled/)
    onevision submit --host https://kfp.example.com --recipe recipes/ov-7b.yaml [--param k=v]
    onevision serve --model s3://onevision/runs/tiny/R/stage2_ov/hf --backend kserve|triton --port 8080
    onevision promote llava-onevision-tiny --version 3 --env prod [--canary 10] --gitops-repo REPO
    onevision rollback llava-onevision-tiny --env prod --gitops-repo REPO

Each subcommand imports its package inside the handler, so `onevision recipe ...` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onevision.cli_exit import one_line

if TYPE_CHECKING:
    from onevision.stack import StackInfo


def _recipe_validate(args: argparse.Namespace) -> int:
    from onevision.recipe import RecipeError, load_recipe

    failed = 0
    for path in args.files:
        try:
            recipe = load_recipe(path)
            print(f"ok      {path}  ({recipe.name}, {len(recipe.stages.enabled())} stages, hash {recipe.hash()[:12]})")
        except RecipeError as err:
            failed += 1
            print(f"INVALID {err}", file=sys.stderr)
    return 1 if failed else 0


def _recipe_show(args: argparse.Namespace) -> int:
    from onevision.recipe import RecipeError, dump_recipe, load_recipe

    try:
        print(dump_recipe(load_recipe(args.file)), end="")
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


def _recipe_plan(args: argparse.Namespace) -> int:
    from onevision.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.file)
        from model.plan import DEFAULT_TEXT_TOKENS, PlanError, plan_recipe

        plan = plan_recipe(recipe, args.gpus_per_node, args.gpu_memory_gb, args.nodes,
                           args.text_tokens or DEFAULT_TEXT_TOKENS)
    except (RecipeError, PlanError) as err:
        print(f"plan: {one_line(err)}", file=sys.stderr)
        return 1
    print(plan.render())
    for line in plan.refusals():
        print(f"does not fit: {line}", file=sys.stderr)
    return 0 if plan.fits else 1


def _curate(args: argparse.Namespace) -> int:
    from components.curate.core import command

    return command(args)  # an error: one line, exit 2 (bad input) or 3 (refused by a check)


def _stack(args: argparse.Namespace) -> int:
    from onevision import stack

    try:
        if args.action == "up":
            info = _stack_up(args)
            print(f"S3 (SeaweedFS)  {info.s3_endpoint}   buckets: {', '.join(stack.BUCKETS)}")
            print(f"MLflow UI       {info.mlflow_uri}")
            print(f"state, logs     {info.state_dir}")
            print('clients:        eval "$(onevision stack env)"')
        elif args.action == "down":
            stopped = stack.stack_down(args.state_dir)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        elif args.action == "status":
            print(json.dumps(stack.stack_status(args.state_dir), indent=1))
        elif args.action == "env":
            for key, value in stack.stack_info(args.state_dir).env().items():
                print(f"export {key}={shlex.quote(value)}")
    except stack.StackError as err:
        print(f"stack {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from onevision import stack
    from onevision.recipe import RecipeError, load_recipe
    from onevision.storage import StorageError
    from pipelines.local import PipelineFailed, print_summary, run_local

    recipe = args.recipe_option or args.recipe
    try:
        load_recipe(recipe)  # before anything starts: the offending field named
        _stack_up(args)  # on the ports asked for; run_local finds it running
        summary = run_local(recipe, state_dir=args.state_dir, run_id=args.run_id, gitops_repo=args.gitops_repo,
                            verbose=args.verbose)
    except RecipeError as err:
        print(f"run: {err}", file=sys.stderr)
        return 1
    except PipelineFailed as err:
        print(f"\nrun FAILED: {err}", file=sys.stderr)
        return 1
    except (stack.StackError, StorageError, OSError) as err:  # a port taken, no git, a full disk...
        print(f"run: {one_line(err)}", file=sys.stderr)
        return 1
    print_summary(summary)
    print(f"wall time {summary['wall_s']:.0f} s")
    return 0


def _stack_up(args: argparse.Namespace) -> StackInfo:
    """Bring the local stack up on the ports asked for (`stack up`, `run`). A stack that already runs
    keeps its ports: say so when other ones were asked for."""
    from onevision import stack

    info = stack.stack_up(args.state_dir, s3_port=args.s3_port or DEFAULT_S3_PORT,
                          mlflow_port=args.mlflow_port or DEFAULT_MLFLOW_PORT)
    running = {"--s3-port": int(info.s3_endpoint.rsplit(":", 1)[1]), "--mlflow-port": int(info.mlflow_uri.rsplit(":", 1)[1])}
    for flag, asked in (("--s3-port", args.s3_port), ("--mlflow-port", args.mlflow_port)):
        if asked and asked != running[flag]:
            print(f"{args.command}: {flag} {asked} ignored: the local stack in {info.state_dir} already runs on "
                  f"port {running[flag]} (`onevision stack down` first to move it)", file=sys.stderr)
    return info


def _compile(args: argparse.Namespace) -> int:
    from pipelines.compile import compile_pipeline, compile_presets

    try:  # RecipeError is a ValueError; so is a recipe outside the repository
        written = compile_presets() if args.all else [compile_pipeline(args.recipe, args.output)]
    except ValueError as err:
        print(f"compile: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"compiled {path}")
    return 0


def _typed_params(items: list[str], declared: dict[str, dict]) -> dict[str, object]:
    """NAME=VALUE pairs typed by the compiled pipeline's parameter declarations (JSON for dicts/lists)."""
    parse = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": lambda v: {"true": True, "false": False}[v.lower()],
             "STRUCT": json.loads, "LIST": json.loads}
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        kind = declared.get(key, {}).get("parameterType", "STRING")  # unknown names: submit names them
        try:
            params[key] = parse.get(kind, str)(value)
        except (ValueError, KeyError) as err:
            raise ValueError(f"--param {key}: {value!r} is not a {kind.lower()} ({err})") from None
    return params


def _submit(args: argparse.Namespace) -> int:
    import tempfile

    import yaml

    from pipelines.compile import compile_pipeline
    from pipelines.submit import SubmitError, pipeline_parameters, submit_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        try:
            package = compile_pipeline(args.recipe, Path(tmp) / "pipeline.yaml")
            name = next(yaml.safe_load_all(package.read_text()))["pipelineInfo"]["name"]  # doc 2: the platform spec
            params = _typed_params(args.param, pipeline_parameters(str(package)))
            result = submit_pipeline(args.host, str(package), name, experiment=args.experiment,
                                     run_name=args.run_name, params=params, token=args.token, namespace=args.namespace)
        except (SubmitError, ValueError) as err:
            print(f"submit: {err}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=1))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serving.serve import serve

    serve(args.model, args.backend, args.port, name=args.name, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, token=args.token)
    return 0


def _promote(args: argparse.Namespace) -> int:
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow would fall back to a new, empty ./mlflow.db
        print(f"{args.command}: set MLFLOW_TRACKING_URI to the registry's tracking server (the local stack: "
              'eval "$(onevision stack env)")', file=sys.stderr)
        return 1
    from mlflow.exceptions import MlflowException

    from components.register.core import RegistryError
    from components.register.promote import promote, rollback

    try:
        if args.command == "promote":
            result = promote(args.name, args.version, args.env, args.gitops_repo, args.canary)
        else:
            result = rollback(args.name, args.env, args.gitops_repo)
    except (RegistryError, MlflowException) as err:  # e.g. no such model or version
        print(f"{args.command}: {one_line(err)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


DEFAULT_S3_PORT, DEFAULT_MLFLOW_PORT = 8333, 5000
S3_PORT_HELP = "S3 port, default 8333; SeaweedFS takes it and the next 9"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onevision", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    recipe = sub.add_parser("recipe", help="validate or show recipes").add_subparsers(dest="action", required=True)
    validate = recipe.add_parser("validate", help="validate recipe files; exit 1 if any is invalid")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(handler=_recipe_validate)
    show = recipe.add_parser("show", help="print the resolved recipe with defaults")
    show.add_argument("file")
    show.set_defaults(handler=_recipe_show)
    plan = recipe.add_parser("plan", help="per-GPU training memory of each stage (meta-device model, no GPU)")
    plan.add_argument("file")
    plan.add_argument("--gpus-per-node", type=int, default=None, help="default: each stage's cluster.steps gpus")
    plan.add_argument("--gpu-memory-gb", type=float, default=None, help="GiB per GPU (default: the step's, 80)")
    plan.add_argument("--nodes", type=int, default=None, help="default: each stage's cluster.steps nodes")
    plan.add_argument("--text-tokens", type=int, default=None,
                      help="text tokens beside the largest visual input of a sample (default 1024)")
    plan.set_defaults(handler=_recipe_plan)

    stack = sub.add_parser("stack", help="the local S3 + MLflow stack on 127.0.0.1")
    stack.add_argument("action", choices=["up", "down", "status", "env"])
    stack.add_argument("--state-dir", default=None, help="pid files, logs, data (default .onevision/stack)")
    stack.add_argument("--s3-port", type=int, default=None, help=S3_PORT_HELP)
    stack.add_argument("--mlflow-port", type=int, default=None, help="MLflow port, default 5000")
    stack.set_defaults(handler=_stack)

    from components.curate.cli import add_arguments  # argparse only: light

    curate = sub.add_parser("curate", help="curate one stage's data mixture into published shards "
                                           "(errors: exit 2 bad input, 3 refused by a check)")
    add_arguments(curate).set_defaults(handler=_curate)

    run = sub.add_parser("run", help="run the pipeline DAG locally (kfp.local) on a recipe, on the local stack")
    run.add_argument("recipe", nargs="?", default="recipes/tiny.yaml")
    run.add_argument("--recipe", dest="recipe_option", default=None, help="recipe YAML (same as the positional)")
    run.add_argument("--state-dir", default=None, help="local stack state dir (default .onevision/stack)")
    run.add_argument("--run-id", default=None, help="pipeline run id; reuse one to resume (default: new)")
    run.add_argument("--verbose", action="store_true",
                     help="also print every task's raw output (kfp.local's stream); it is in the task logs either way")
    run.add_argument("--gitops-repo", default=os.environ.get("ONEVISION_GITOPS_REPO"),
                     help="GitOps repository the deploy step pushes to (default: a bare repo in the state dir)")
    run.add_argument("--s3-port", type=int, default=None, help=S3_PORT_HELP + " (when the run starts the stack)")
    run.add_argument("--mlflow-port", type=int, default=None,
                     help="MLflow port, default 5000 (when the run starts the stack)")
    run.set_defaults(handler=_run)

    comp = sub.add_parser("compile", help="compile the KFP pipeline of a recipe to YAML")
    comp.add_argument("--recipe", help="a recipe in the repository's recipes/ folder (the image carries only those)")
    comp.add_argument("-o", "--output", help="compiled pipeline YAML to write")
    comp.add_argument("--all", action="store_true", help="every recipes/*.yaml -> pipelines/compiled/")
    comp.set_defaults(handler=_compile)

    submit = sub.add_parser("submit", help="upload the recipe's pipeline (a new version) and start a run")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--recipe", required=True)
    submit.add_argument("--experiment", default="onevision")
    submit.add_argument("--run-name", default=None)
    submit.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user KFP)")
    submit.add_argument("--token", default=None, help="bearer token (default $KFP_TOKEN)")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter, e.g. stage2_si_learning_rate=1e-5 (JSON for dicts/lists)")
    submit.set_defaults(handler=_submit)

    serve = sub.add_parser("serve", help="serve a model on 127.0.0.1 behind KServe or Triton")
    serve.add_argument("--model", required=True, help="HF folder (path or s3://) or models:/NAME@ALIAS")
    serve.add_argument("--backend", choices=["kserve", "triton"], default="kserve")
    serve.add_argument("--port", type=int, default=8080, help="HTTP port (Triton also takes the next two)")
    serve.add_argument("--name", default="onevision", help="model name in the routes")
    serve.add_argument("--max-batch-size", type=int, default=8)
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="dynamic batching queue delay")
    serve.add_argument("--token", default=None,
                       help="bearer token required by the routes (Triton: through an authenticating front on "
                            "PORT, tritonserver on PORT+1, gRPC off); $ONEVISION_SERVING_TOKEN keeps it out of "
                            "the process list")
    serve.set_defaults(handler=_serve)

    gitops = os.environ.get("ONEVISION_GITOPS_REPO")
    promote = sub.add_parser("promote", help="set champion and write the endpoint's GitOps overlay (a new branch)")
    promote.add_argument("name", help="registered model, e.g. llava-onevision-tiny")
    promote.add_argument("--version", required=True)
    promote.add_argument("--env", required=True, help="environment folder in the GitOps repo (dev, prod...)")
    promote.add_argument("--canary", type=int, default=None, help="canaryTrafficPercent for the new version")
    promote.add_argument("--gitops-repo", default=gitops, required=gitops is None,
                         help="path or URL of the GitOps repository (default $ONEVISION_GITOPS_REPO)")
    promote.set_defaults(handler=_promote)
    rollback = sub.add_parser("rollback", help="restore previous-champion and write its overlay")
    rollback.add_argument("name")
    rollback.add_argument("--env", required=True)
    rollback.add_argument("--gitops-repo", default=gitops, required=gitops is None)
    rollback.set_defaults(handler=_promote)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compile" and not args.all and not (args.recipe and args.output):
        parser.error("compile: give --recipe and -o, or --all")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
