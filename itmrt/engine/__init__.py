"""TensorRT: building engines from a bundle's precision graphs, checking a built engine fits this machine, doctor.

Imports TensorRT only when an engine is built (never torch); everything else in
itmrt works without it.
"""
