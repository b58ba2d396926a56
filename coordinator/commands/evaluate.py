"""`gaggle-coordinator evaluate V...`: evaluate versions now (say, ones made before evaluation
was configured), record them locally and in MLflow."""

from __future__ import annotations

import argparse

from coordinator.commands.options import ray_options, replay_line, store_option, tracking_option


def add_parser(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="evaluate versions on public tasks now")
    evaluate.add_argument("versions", nargs="+", metavar="VERSION", help="version ids")
    store_option(evaluate)
    evaluate.add_argument("--eval-config", required=True,
                          help="TOML/JSON evaluation config (see coordinator.checks.evaluation)")
    tracking_option(evaluate)
    ray_options(evaluate)
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.checks.evaluation import EvalPool, EvaluationConfig, evaluate_version
    from coordinator.ray_cluster import RayConfig, parse_resources
    from coordinator.store.experts import Store
    from coordinator.store.versions import VersionStore
    from coordinator.tracking.tracker import Tracker

    versions = VersionStore(args.store)
    ids = [versions.resolve(v) for v in args.versions]
    config = EvaluationConfig.from_file(args.eval_config)
    store = Store(args.store)
    try:
        spec = store.cached_base_spec()
    finally:
        store.close()
    tracker = Tracker(args.store, args.tracking_uri)
    pool = EvalPool(config, RayConfig(ray_address=args.ray_address,
                                      resources=parse_resources(args.ray_resources)))
    try:
        for version_id in ids:
            record = evaluate_version(args.store, version_id, pool, tracker,
                                      base=spec.name if spec else None)
            scores = " ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
            print(f"version {version_id}: {scores} ({record['seconds']:.1f} s)")
    finally:
        pool.shutdown()
    print(replay_line(tracker))
    return 0
