"""Checkpoint -> verified ONNX bundle (the torch side): load, build the family's graphs, judge parity, publish.

:mod:`~itmrt.export.bundle` runs the stages; :mod:`~itmrt.export.sample_parity`
compares ONNX Runtime with the PyTorch reference on sample inputs. The graphs
themselves come from :mod:`itmrt.graphs` through the family spec
(:mod:`itmrt.families`); what a bundle is lives in :mod:`itmrt.bundle`.
"""
