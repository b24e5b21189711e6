"""Tools over the library and the pipeline: benchmarks, op counts, TVM demo, TensorRT, MADDness comparison.

Each module has a ``main(argv)`` reached through the ``lutnn`` console command (:mod:`lutnn.cli`).
"""
