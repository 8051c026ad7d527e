"""Test parts that ship with the library, for this project's tests and users' own: the deterministic mock LM
(``mock_lm``, answers from ``mockgen``), its OpenAI-compatible HTTP server (``mock_server``), and a private
Redis launcher (``redis_server``)."""
