"""Serving defaults, with their reasons (a plain module: the CLI reads them without pydantic)."""

APP_NAME = "cnnray"  # the Serve application
DEPLOYMENT = "ModelServer"  # its predict deployment (the other, ExplainServer, answers :explain)

MAX_BATCH_SIZE = 32  # images per forward pass; 32 concurrent clients fill one batch
BATCH_WAIT_S = 0.002  # seconds a batch waits to fill up (+2 ms when idle); 2 ms beat 0, 1, 5 and 10 ms in the README's load benchmark
MAX_BODY_BYTES = 8 * 1024 * 1024  # 8 MiB: 64 photos as base64 JPEG, or 64 CIFAR arrays in JSON
MAX_INSTANCES = 64  # instances per :predict request (two full batches)
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height of an uploaded image, checked before decoding
# width x height summed over a request's images, checked from their headers before any is
# decoded: one 4096 x 4096 photo, or 64 of 512 x 512 (~0.5 s of PNG decoding on one core).
MAX_REQUEST_PIXELS = 4096 * 4096
BODY_TIMEOUT_S = 10.0  # seconds for the whole body to arrive once the headers have (8 MiB at ~1 MB/s)
# An oversized body is read and discarded up to this many bytes before the 413 is sent, so
# clients that send the whole body before reading the answer (urllib, requests) read it
# instead of a connection reset; a longer one is answered at once, with Connection: close.
MAX_DRAIN_BYTES = 128 * 1024 * 1024
DECODE_THREADS = 2  # per app: large JSON bodies are parsed there, never on the event loop
# A :predict body up to this size is parsed on the event loop (~0.1 ms at most: one MNIST or
# CIFAR PNG in base64 is 1-4 KiB), where a thread hop would cost more than the parse; larger
# ones on the DECODE_THREADS pool. Image files are decoded in the batch, on its thread.
INLINE_PARSE_BYTES = 16 * 1024
# Per replica; must be >= max_batch_size or batches never fill. Generous, because a request
# whose body is still arriving costs the replica a coroutine and its bytes so far, nothing
# more (the body timeout ends it, the buffered-bytes budget caps the memory): 140 stalled
# clients must not take the slots that working clients need.
MAX_ONGOING_REQUESTS = 512
MAX_BUFFERED_BYTES = 256 * 1024 * 1024  # request bodies one replica holds at once; beyond: 429
STORE_WATCH_S = 5.0  # seconds between a replica's looks at the model store (a directory listing)
# What runs a replica's forward passes (serve/runtime.py): "torch" or "onnxruntime".
DEFAULT_RUNTIME = "torch"  # measured against onnxruntime with benchmarks.serve_load: docs/export.md
