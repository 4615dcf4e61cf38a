"""Exported files of a cnnray checkpoint: ONNX (run by ONNX Runtime, Triton, browsers) and
torch.export `.pt2`, each holding normalisation and test-time augmentation, and checked
against the checkpoint at export.

    from cnnray.export.files import export_checkpoint
    report = export_checkpoint("runs/mnist", "onnx", "mnist.onnx")   # `cnnray export` does this

Modules: graph.py (the wrapped model), onnx.py and pt2.py (one format each), verify.py (the
comparison with the checkpoint), files.py (source folders, the test sample, writing).
Nothing here imports the training loop except verify's test-set loader, and Serve imports
only graph.py and onnx.py.
"""
