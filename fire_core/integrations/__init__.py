"""The trainer integrations: each a thin translation of a trainer's objects into one adapter call.

``lightning``, ``transformers`` and ``sb3`` call :mod:`fire_core.torch`;
``optax`` calls :mod:`fire_core.flax`. Each imports its trainer at its top
and holds no math and no schedule logic (:mod:`fire_core.schedule` decides
when). Users import them by their short paths, ``fire_core.lightning`` and
so on (``fire_core._PUBLIC``).
"""
