"""Serving defaults, with their reasons (a plain module: the CLI reads them without pydantic)."""

APP_NAME = "cnnray"  # the Serve application
DEPLOYMENT = "ModelServer"  # its one deployment

MAX_BATCH_SIZE = 32  # images per forward pass; 32 concurrent clients fill one batch
BATCH_WAIT_S = 0.005  # seconds a batch waits to fill up: at most +5 ms latency when idle
MAX_BODY_BYTES = 8 * 1024 * 1024  # 8 MiB: 64 photos as base64 JPEG, or 64 CIFAR arrays in JSON
MAX_INSTANCES = 64  # instances per :predict request (two full batches)
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height of an uploaded image, checked before decoding
MAX_ONGOING_REQUESTS = 128  # per replica; must be >= max_batch_size or batches never fill
STORE_WATCH_S = 5.0  # seconds between a replica's looks at the model store (a directory listing)
