"""The test harness: real servers, stores, bundles and clients that the tests and the benchmarks
share (`python -m bench.X` imports it from the repository root, with no path set-up).

- `servers`: a coordinator, an MLflow server (`MlflowServer`) or any command as a process on
  a free loopback port, stopped by its PID.
- `stores`: a coordinator store filled with synthetic experts.
- `bundles`: bundle archives, raw uploads and store snapshots for the upload tests.
- `hostile`: the hostile client's attacks on the gRPC surface.
- `loadgen`: many contributors uploading at once.
- `chaos`: a federation whose processes are killed and restarted.
- `raycluster`: a multi-node Ray cluster on loopback.
- `postgres`: a throwaway PostgreSQL server for MLflow's backend store.
"""
