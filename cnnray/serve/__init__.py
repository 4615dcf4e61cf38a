"""Serving: cnnray checkpoints behind an HTTP API on Ray Serve (`cnnray serve`).

    cnnray serve --model-store runs/store                  # newest version of every model
    cnnray serve --checkpoint runs/x/ray/x/epoch-0003 --name mnist --port 8000
    cnnray predict --url http://127.0.0.1:8000 --model mnist digit.png

Modules: schemas (pydantic), preprocess (payload -> model input, as in training), engine
(loading checkpoints, forward passes), api (the FastAPI routes), lean (the inference routes
without FastAPI's middleware and router), metrics (Prometheus),
app (the Serve deployment and its typed app builder), runner (deploy and hot-swap), ingress
(Ray Serve's fast ingress settings, applied before Ray starts), haproxy_loopback (HAProxy's
operator ports on loopback), cli; oip_core, oip (REST), oip_binary and oip_grpc (the Open
Inference Protocol v2, with proto/ its gRPC messages), multipart (form uploads), autoscale
(`--replicas MIN-MAX`).
Importing this package does no work.
"""
