"""The torch-free bundle: the names, file layout and (as it grows) the typed manifest and its checks.

Everything that reads or writes a bundle folder - export, calibration, engine
build, the runtime, reports - takes the bundle's vocabulary from here.
"""
