"""Experiment tracking and the model registry in MLflow (`--tracking mlflow`, `--register`).

    cnnray train --tracking mlflow --tracking-uri http://127.0.0.1:5000 --experiment digits ...
    cnnray tune  --tracking mlflow --register digits-cnn ...
    cnnray register runs/x --name digits-cnn

One training run is one MLflow run, whatever the number of workers: the driver creates it
before any worker starts (an unreachable tracker is a one-line error, exit 2), stores its
id in `<out>/mlflow.json` (so --resume continues it), and only rank 0 logs from the
training loop (`train.WorkerTracker`): Ray Train V2 refuses Tune's logger callbacks inside a
Train run (ray#64272). A sweep is a parent run with one child per trial, logged by Ray's
`MLflowLoggerCallback` on the Tune driver (`sweep`), its calls made on a background thread
(`background`): Tune's driver loop never waits for the network. A tracker that stops
answering mid-run is warned about once and then left alone: it never fails the training run.

Modules: `params` (plain values: no MLflow import), `client` (the URI, the reachability
check, warn-once logging), `background` (one ordered worker thread), `train`, `sweep`, `registry`. Nothing here imports the CLI;
serving reads the registry through `cnnray.serve.registry` only.
"""
