"""The tools: the ``fire-core`` command (``cli``, its files in ``_files``), ``testing`` and its
pytest plugin, and the demo. Users import them by their short paths, ``fire_core.testing`` and
so on (``fire_core._PUBLIC``).
"""
