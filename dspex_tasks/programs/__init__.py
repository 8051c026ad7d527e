"""Programs: DSPy modules built for signatures (``bridge``), stored state loaded safely into them
(``state``), the versioned session store in Redis and its in-memory twin (``store``), and the per-process
cache of warm modules (``cache``)."""
