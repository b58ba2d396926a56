"""The coordinator service, in rooms, each importing only the rooms below it:

    cli, commands/   the `gaggle-coordinator` subcommands (one module each)
    server.py        ServerConfig and the gRPC server that wires the rooms together
    service/         the gRPC edge: Coordinator and Admin servicers, token auth, health
    versions/        router versions: assembly on Ray, the assembler thread that checks each
                     version before it goes live, diff, promotion, pruning, history
    checks/          what a version is checked on: the usage check (in its own process),
                     the verdict, evaluation
    intake/          receiving a bundle: resumable uploads and their writer
    tracking/        recording in MLflow: the durable queue, its replay, names, model cards
    store/           what is on disk: the Layout, the content-addressed objects, the expert
                     index, the version folders
    ray_cluster.py   where Ray runs (local on 127.0.0.1, or a cluster)

tests/test_import_directions.py keeps these directions true (its ROOMS table).
"""
