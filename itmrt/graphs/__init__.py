"""ONNX graphs of the reference models' components, built node by node from their PyTorch weights.

:mod:`~itmrt.graphs.onnx_graph` is the small builder every graph uses;
:mod:`~itmrt.graphs.image_encoders`, :mod:`~itmrt.graphs.text_encoders` and
:mod:`~itmrt.graphs.scorers` hold one builder per component of each model
family. The family specs (:mod:`itmrt.families`) pick the builders of their
family; :mod:`itmrt.export` runs them, checks and publishes the result.
"""
