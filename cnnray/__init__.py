"""cnnray: train the classic CNNs on Ray Train, sweep them with Ray Tune, serve them with Ray Serve.

Importing the package does no work: models, data and Ray are imported where they are used.
"""

__version__ = "0.1.0"
