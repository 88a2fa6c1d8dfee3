"""The array-API core: FIRE's math, written once for every array library.

Everything here works on arrays of any library that follows the array API
standard (NumPy, PyTorch, JAX, CuPy, array-api-strict) and imports no
framework: ``_array`` is the only importer of ``array_api_compat``, and no
module here imports from ``fire_core``'s adapters (``torch``, ``flax``,
``cupy``), its ``integrations`` or its ``tools``. Data flows down: they call
the core, the core never calls back up (docs/architecture.md).

* ``_array``: the namespace of an array, dtypes, devices, host transfers;
* ``polar``: the Newton-Schulz / fast / SVD polar projection;
* ``layout``: layouts (``"oihw"``) <-> batches of matrices, the layer scale;
* ``metrics``, ``diagnostics``: SFE, DfI, dormant ratio, srank, drift;
* ``plan``: many named weights -> grouped, batched FIRE and a Report;
  ``checks``: what ``plan`` validates before any work;
* ``report``: the Report;
* ``patterns``: include/exclude globs; ``name_rules``: what a flat name and
  shape say (layout, blocks); ``conventions``: the state-dict selection
  built on both, and ``apply_inplace`` for dicts of mutable arrays;
* ``triggers``: when to fire; ``schedule``: triggers polled together,
  firings recorded, progress saved.
"""
