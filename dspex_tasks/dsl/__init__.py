"""The signature DSL: the parser and type system (``types``), validation and the ``Signature`` class
(``signature``), JSON Schemas in providers' forms (``schemas``), and the ``dspy.Signature`` rendering
(``dspy_signature``, the only module here that imports dspy, and only when asked)."""
