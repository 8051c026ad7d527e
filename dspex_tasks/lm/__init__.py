"""Language models: construction from settings (``factory``), the governed LM with fleet-wide rate limits,
the shared response cache, retries and fallbacks (``governed``, ``ratelimit``, ``cache``), usage and cost
(``usage``), the OpenAI-shaped response (``response``), what each failure means (``errors``), and the Lua
scripts (``lua/``)."""
